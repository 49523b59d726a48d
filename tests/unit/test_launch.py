from __future__ import annotations

from pathlib import Path

from controller.catalog import Catalog
from controller.config import validate_config
from controller.launch import build_launch_spec, model_policy, requirements_from_labels
from controller.lifecycle.model import Requirements


async def entry_for(tmp_path: Path, tiny_model: Path, model: dict[str, object], **sections: object):  # type: ignore[no-untyped-def]
    config = validate_config(
        {"models_dir": str(tmp_path), "models": {"m": {"path": str(tiny_model), **model}}, **sections}
    )
    catalog = Catalog(config)
    await catalog.refresh()
    entry = await catalog.lookup("m")
    return config, entry


async def test_launch_argv_is_a_list_with_model_alias_and_slots(tmp_path: Path, tiny_model: Path) -> None:
    config, entry = await entry_for(tmp_path, tiny_model, {"max_concurrent": 2, "ctx_size": 1024})
    spec = build_launch_spec(entry, config, "/bin/llama-server", Requirements(), {"--no-webui"})
    assert spec.argv == (
        "/bin/llama-server",
        "--model",
        str(tiny_model),
        "--alias",
        "m",
        "--ctx-size",
        "2048",
        "--parallel",
        "2",
        "--no-webui",
    )
    assert spec.model == "m:latest"


async def test_launch_context_is_capped_at_the_trained_size(tmp_path: Path, tiny_model: Path) -> None:
    config, entry = await entry_for(tmp_path, tiny_model, {"max_concurrent": 1}, defaults={"ctx_size": 100000})
    spec = build_launch_spec(entry, config, "llama-server", Requirements(), ())
    assert spec.argv[spec.argv.index("--ctx-size") + 1] == "2048"


async def test_launch_embeddings_gpus_and_extra_args(tmp_path: Path, tiny_model: Path) -> None:
    config, entry = await entry_for(
        tmp_path,
        tiny_model,
        {"gpus": [1, 3], "n_gpu_layers": 99, "args": ["--threads", "2"]},
        defaults={"args": ["--metrics"]},
    )
    spec = build_launch_spec(entry, config, "llama-server", Requirements(embeddings=True), ())
    argv = list(spec.argv)
    assert argv[-6:] == ["--embeddings", "--pooling", "mean", "--metrics", "--threads", "2"]
    assert argv[argv.index("--n-gpu-layers") + 1] == "99"
    assert spec.env["CUDA_VISIBLE_DEVICES"] == "1,3"
    assert requirements_from_labels(spec.labels) == Requirements(embeddings=True)


async def test_launch_gpus_none_means_cpu_only(tmp_path: Path, tiny_model: Path) -> None:
    config, entry = await entry_for(tmp_path, tiny_model, {"gpus": "none"})
    spec = build_launch_spec(entry, config, "llama-server", Requirements(), ())
    assert spec.env["CUDA_VISIBLE_DEVICES"] == ""
    assert spec.argv[spec.argv.index("--n-gpu-layers") + 1] == "0"


async def test_launch_spec_hash_changes_with_the_command(tmp_path: Path, tiny_model: Path) -> None:
    config, entry = await entry_for(tmp_path, tiny_model, {})
    plain = build_launch_spec(entry, config, "llama-server", Requirements(), ())
    embed = build_launch_spec(entry, config, "llama-server", Requirements(embeddings=True), ())
    assert plain.spec_hash != embed.spec_hash
    assert plain.spec_hash == build_launch_spec(entry, config, "llama-server", Requirements(), ()).spec_hash


async def test_launch_policy_takes_model_values_over_defaults(tmp_path: Path, tiny_model: Path) -> None:
    config, entry = await entry_for(
        tmp_path, tiny_model, {"keep_alive": "1m", "pinned": True}, defaults={"keep_alive": "5m", "queue_depth": 7}
    )
    policy = model_policy(entry, config)
    assert (policy.keep_alive, policy.queue_depth, policy.pinned) == (60.0, 7, True)
