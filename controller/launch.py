"""How one catalog entry becomes a llama-server command line and a lifecycle policy (pure functions)."""

from __future__ import annotations

from collections.abc import Collection, Mapping

from controller.catalog import CatalogEntry
from controller.config import Config
from controller.lifecycle.model import ModelPolicy, Requirements
from controller.runtime.base import LaunchSpec


def model_policy(entry: CatalogEntry, config: Config) -> ModelPolicy:
    """The model's own settings where given, else ``defaults``."""
    model, defaults = entry.config, config.defaults

    def pick(value: float | int | None, default: float | int) -> float:
        return float(default if value is None else value)

    return ModelPolicy(
        keep_alive=pick(model.keep_alive if model else None, defaults.keep_alive),
        startup_timeout=pick(model.startup_timeout if model else None, defaults.startup_timeout),
        health_interval=defaults.health_interval,
        stop_timeout=config.runtime.stop_timeout,
        max_concurrent=int(pick(model.max_concurrent if model else None, defaults.max_concurrent)),
        queue_depth=int(pick(model.queue_depth if model else None, defaults.queue_depth)),
        pinned=bool(model and model.pinned),
    )


def context_size(entry: CatalogEntry, config: Config, requirements: Requirements) -> int:
    """Context per request: the largest asked for, else configured; never above what the model was trained for."""
    configured = entry.config.ctx_size if entry.config and entry.config.ctx_size else config.defaults.ctx_size
    wanted = max(configured, requirements.ctx_size or 0)
    trained = entry.metadata.context_length if entry.metadata else None
    return min(wanted, trained) if trained else wanted


def gpu_ids(entry: CatalogEntry, config: Config) -> tuple[str, ...]:
    """GPU ids the model uses, for the memory budget; "all" means every GPU that has a budget."""
    gpus = entry.config.gpus if entry.config else "all"
    if gpus == "none":
        return ()
    if gpus == "all":
        return tuple(sorted(config.scheduling.gpu_memory))
    return tuple(str(gpu) for gpu in gpus)


def memory_estimate(entry: CatalogEntry) -> int:
    return entry.config.memory if entry.config and entry.config.memory else entry.size


def build_launch_spec(
    entry: CatalogEntry,
    config: Config,
    binary: str,
    requirements: Requirements,
    supported_flags: Collection[str] = (),
) -> LaunchSpec:
    """The argv (binary first) and environment for this model; the runtime adds host and port."""
    policy = model_policy(entry, config)
    parallel = policy.max_concurrent
    ctx = context_size(entry, config, requirements)
    argv: list[str] = [
        binary,
        "--model",
        str(entry.path),
        "--alias",
        entry.name,
        # -c is the total KV size shared by the slots: each request gets ctx tokens (Ollama's num_ctx).
        "--ctx-size",
        str(ctx * parallel),
        "--parallel",
        str(parallel),
    ]
    if "--no-webui" in supported_flags:
        argv.append("--no-webui")
    model = entry.config
    n_gpu_layers = model.n_gpu_layers if model and model.n_gpu_layers is not None else config.defaults.n_gpu_layers
    env: dict[str, str] = dict(config.llama_server.env)
    gpus = model.gpus if model else "all"
    if gpus == "none":
        env["CUDA_VISIBLE_DEVICES"] = ""
        n_gpu_layers = 0
    elif gpus != "all":
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(gpu) for gpu in gpus)
    if n_gpu_layers is not None:
        argv += ["--n-gpu-layers", str(n_gpu_layers)]
    if model and model.mmproj:
        argv += ["--mmproj", str(model.mmproj)]
    if requirements.embeddings or (model and model.embeddings):
        argv.append("--embeddings")
        if entry.metadata is None or entry.metadata.pooling_type is None:
            argv += ["--pooling", "mean"]  # without it /v1/embeddings answers 400 on chat models
    extra = [*config.defaults.args, *(model.args if model else [])]
    meta = entry.metadata
    if meta and not meta.chat_template and meta.architecture.startswith("gemma") and "--chat-template" not in extra:
        # Gemma GGUFs often ship without a template; llama-server would fall back to ChatML, which Gemma
        # does not know. Its built-in "gemma" format is the model's own, but built-in names only work with
        # Jinja off: with Jinja on (the default) "gemma" is read as a template and every prompt becomes "gemma".
        argv += ["--no-jinja", "--chat-template", "gemma"]
    argv += extra
    labels = {
        "embeddings": str(int(requirements.embeddings)),
        "ctx_size": str(requirements.ctx_size or ""),
        "ctx_requested": str(int(requirements.ctx_requested)),
    }
    return LaunchSpec(model=entry.key, argv=tuple(argv), env=env, fingerprint=entry.fingerprint, labels=labels)


def requirements_from_labels(labels: Mapping[str, str]) -> Requirements:
    """Inverse of the labels written above: what an adopted backend was started for."""
    ctx = labels.get("ctx_size", "")
    return Requirements(
        embeddings=labels.get("embeddings") == "1",
        ctx_size=int(ctx) if ctx.isdigit() else None,
        ctx_requested=labels.get("ctx_requested") == "1",
    )
