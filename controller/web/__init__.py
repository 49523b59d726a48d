"""The web page (``/ui/``): server-rendered, enhanced by htmx where its files are installed."""

from __future__ import annotations

from typing import Any

from werkzeug.exceptions import RequestEntityTooLarge

from common.errors import LlamaControllerError
from controller.bodies import too_large
from controller.web import accounts, pages  # noqa: F401 - their routes register on the blueprint
from controller.web.base import blueprint, htmx, viewer


@blueprint.errorhandler(LlamaControllerError)
async def page_error(exc: LlamaControllerError) -> Any:
    """Errors of the web page as a page (or, for htmx, a short fragment), never JSON or a stack trace."""
    if htmx():
        return f'<p class="alert" role="alert">{_escape(exc.message)}</p>', exc.status
    me = await viewer()
    titles = {401: "Please sign in", 403: "Not allowed", 404: "Not found"}
    return (
        await pages.render(
            "error.html",
            me,
            status=exc.status,
            title=titles.get(exc.status, "Something went wrong"),
            message=exc.message,
        ),
        exc.status,
    )


@blueprint.errorhandler(RequestEntityTooLarge)
async def form_too_large(exc: RequestEntityTooLarge) -> Any:
    """A form over the limit (the sign-in form has a small one): the 413 as a page, like any other error."""
    return await page_error(too_large(exc))


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


__all__ = ["blueprint"]
