"""ModelProfile: a model's settings resolved once, and the LaunchSpec it asks llama-server for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from common.errors import BadRequest
from controller.catalog.entries import Catalog
from controller.catalog.profile import ModelProfile, build_profile
from controller.catalog.requirements import Requirements
from controller.config import validate_config
from controller.runtime.base import visible_devices


async def profile_for(tmp_path: Path, tiny_model: Path, model: dict[str, Any], **sections: Any) -> ModelProfile:
    config = validate_config(
        {"models_dir": str(tmp_path), "models": {"m": {"path": str(tiny_model), **model}}, **sections}
    )
    catalog = Catalog(config)
    await catalog.refresh()
    return build_profile(await catalog.lookup("m"), config, {"--no-webui"})


async def test_profile_spec_names_the_model_file_alias_and_slots(tmp_path: Path, tiny_model: Path) -> None:
    profile = await profile_for(tmp_path, tiny_model, {"max_concurrent": 2, "ctx_size": 1024})
    spec = profile.spec(profile.effective(Requirements()))
    assert spec.model == "m:latest" and spec.model_file == tiny_model
    assert spec.args == (
        "--alias", "m", "--ctx-size", "2048", "--parallel", "2", "--n-predict", "16384", "--no-webui"
    )  # fmt: skip


async def test_profile_context_is_capped_at_the_trained_size(tmp_path: Path, tiny_model: Path) -> None:
    profile = await profile_for(tmp_path, tiny_model, {"max_concurrent": 1}, defaults={"ctx_size": 100000})
    args = profile.spec(profile.effective(Requirements())).args
    assert args[args.index("--ctx-size") + 1] == "2048"


async def test_profile_embeddings_gpus_and_extra_args(tmp_path: Path, tiny_model: Path) -> None:
    profile = await profile_for(
        tmp_path,
        tiny_model,
        {"gpus": [1, 3], "n_gpu_layers": 99, "args": ["--threads", "2"]},
        defaults={"args": ["--metrics"]},
    )
    spec = profile.spec(Requirements(embeddings=True))
    args = list(spec.args)
    assert args[-6:] == ["--embeddings", "--pooling", "mean", "--metrics", "--threads", "2"]
    assert args[args.index("--n-gpu-layers") + 1] == "99"
    assert spec.gpus == (1, 3) and visible_devices(spec.gpus) == "1,3"
    assert profile.budget_gpus == ("1", "3")
    assert Requirements.from_labels(spec.labels) == Requirements(embeddings=True)


async def test_profile_gpus_none_means_cpu_only(tmp_path: Path, tiny_model: Path) -> None:
    profile = await profile_for(tmp_path, tiny_model, {"gpus": "none"})
    spec = profile.spec(Requirements())
    assert visible_devices(spec.gpus) == ""
    assert spec.args[spec.args.index("--n-gpu-layers") + 1] == "0"


async def test_profile_spec_hash_changes_with_what_is_asked_only(tmp_path: Path, tiny_model: Path) -> None:
    profile = await profile_for(tmp_path, tiny_model, {})
    plain = profile.spec(Requirements())
    assert plain.spec_hash != profile.spec(Requirements(embeddings=True)).spec_hash
    assert plain.spec_hash == profile.spec(Requirements()).spec_hash


async def test_profile_policy_takes_model_values_over_defaults(tmp_path: Path, tiny_model: Path) -> None:
    profile = await profile_for(
        tmp_path, tiny_model, {"keep_alive": "1m", "pinned": True}, defaults={"keep_alive": "5m", "queue_depth": 7}
    )
    assert (profile.policy.keep_alive, profile.policy.queue_depth, profile.policy.pinned) == (60.0, 7, True)


async def test_profile_a_request_cannot_raise_the_context_above_max_ctx(tmp_path: Path, tiny_model: Path) -> None:
    profile = await profile_for(tmp_path, tiny_model, {"ctx_size": 256, "max_ctx": 512, "max_concurrent": 1})
    asked = profile.effective(Requirements(ctx_size=1_000_000, ctx_requested=True))
    assert asked.ctx_size == 512  # not the trained 2048 that 1,000,000 was capped at before
    args = profile.spec(asked).args
    assert args[args.index("--ctx-size") + 1] == "512"
    assert profile.effective(Requirements(ctx_size=400, ctx_requested=True)).ctx_size == 400
    profile.check_limits(1_000_000, 1_000_000)  # clamp (the default) refuses nothing


async def test_profile_configured_context_is_never_cut_by_max_ctx(tmp_path: Path, tiny_model: Path) -> None:
    profile = await profile_for(tmp_path, tiny_model, {"ctx_size": 1024}, defaults={"max_ctx": 512})
    assert profile.effective(Requirements(ctx_size=2048, ctx_requested=True)).ctx_size == 1024
    assert profile.effective(Requirements()).ctx_size == 1024


async def test_profile_max_predict_caps_every_route_through_llama_server(tmp_path: Path, tiny_model: Path) -> None:
    profile = await profile_for(tmp_path, tiny_model, {"max_predict": 100})
    args = profile.spec(Requirements()).args
    assert args[args.index("--n-predict") + 1] == "100"
    unlimited = await profile_for(tmp_path, tiny_model, {}, defaults={"max_predict": None})
    assert "--n-predict" not in unlimited.spec(Requirements()).args


async def test_profile_over_limit_refuse_names_the_limit(tmp_path: Path, tiny_model: Path) -> None:
    profile = await profile_for(
        tmp_path, tiny_model, {"max_ctx": 512, "max_predict": 100}, defaults={"over_limit": "refuse"}
    )
    with pytest.raises(BadRequest, match=r"num_ctx 8192 is above the most model 'm' allows per request \(4096"):
        profile.check_limits(8192, None)
    with pytest.raises(BadRequest, match=r"num_predict 101 is above the most model 'm' generates per request \(100"):
        profile.check_limits(None, 101)
    profile.check_limits(4096, 100)  # the configured context (4096) is always allowed; 100 is the limit itself
    profile.check_limits(None, None)  # a negative num_predict asks for "no limit": it gets max_predict
