"""``GET /control/v1/system``: what runs here — versions, runtime, store, the edge, leadership, the llama-server
build."""

from __future__ import annotations

import asyncio
from typing import Any

from quart import Blueprint

from common.errors import LlamaControllerError
from controller import __version__
from controller.config import Config
from controller.services import services
from controller.settings import find_llama_server, llama_server_version

blueprint = Blueprint("control_system", __name__, url_prefix="/control/v1")


async def llama_server_facts(config: Config) -> dict[str, Any]:
    image = config.runtime.llama_server_image
    if image is not None:
        return {"image": image}
    try:
        binary = await asyncio.to_thread(find_llama_server, config.llama_server.binary)
    except LlamaControllerError as exc:
        return {"binary": None, "error": exc.message}
    return {"binary": binary, "version": await asyncio.to_thread(llama_server_version, binary)}


@blueprint.get("/system")
async def system() -> dict[str, Any]:
    config: Config = services().config
    edge = services().edge
    leadership = services().leadership
    return {
        "version": __version__,
        "runtime": config.runtime.kind,
        "store": config.store.kind,
        "listen": config.server.listen,
        "edge": edge.public() if edge is not None else {"enabled": False},
        "leadership": {
            "kind": leadership.kind,
            "leading": leadership.leading,
            "term": leadership.fencing_token,
            "identity": leadership.identity,
        },
        "llama_server": await llama_server_facts(config),
    }
