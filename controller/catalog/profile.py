"""A model's effective settings, resolved once from its catalog entry and the config (pure).

Everything the lifecycle and the runtimes ask about a model — its policy, context, GPUs, memory estimate,
capabilities and what llama-server is asked to do — is derived here when the entry or the config changes,
and read from the resulting immutable ``ModelProfile`` afterwards (never re-derived per request).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from common.errors import BadRequest
from controller.catalog.entries import CatalogEntry
from controller.catalog.requirements import ModelPolicy, Requirements
from controller.config import Config
from controller.runtime.base import GpuSelection, LaunchSpec, Placement

_POOLING_RANK = 4  # llama.cpp's LLAMA_POOLING_TYPE_RANK: a reranker's GGUF says so


def capabilities(entry: CatalogEntry) -> tuple[str, ...]:
    """What the GGUF says the model can do (Ollama's capability names)."""
    meta = entry.metadata
    if meta is None:
        return ()
    caps: list[str] = []
    embedding_only = meta.pooling_type is not None and not meta.chat_template
    if not embedding_only:
        caps.append("completion")
    if embedding_only or (entry.config and entry.config.embeddings):
        caps.append("embedding")
    template = meta.chat_template or ""
    if "tools" in template:
        caps.append("tools")
    if "<think>" in template or "enable_thinking" in template or "reasoning_content" in template:
        caps.append("thinking")
    if meta.has_vision or (entry.config and entry.config.mmproj):
        caps.append("vision")
    if any(key in meta.values for key in ("tokenizer.ggml.fim_pre_token_id", "tokenizer.ggml.prefix_token_id")):
        caps.append("insert")
    return tuple(caps)


@dataclass(frozen=True)
class ModelProfile:
    entry: CatalogEntry
    policy: ModelPolicy
    gpus: GpuSelection
    budget_gpus: tuple[str, ...]  # GPU ids whose memory budget this model counts against
    memory: int  # estimated bytes, for the budget
    configured_ctx: int  # tokens per request from the config, before a request raises it
    trained_ctx: int | None
    max_ctx: int | None  # the most a request's num_ctx may raise the context to (never below configured_ctx)
    max_predict: int | None  # tokens one request may generate, on every route (--n-predict and proxy/limits.py)
    refuse_over_limit: bool  # a request above a limit is refused (400) rather than clamped
    n_gpu_layers: int | None
    embeddings_always: bool
    needs_pooling: bool  # a chat model serving embeddings needs --pooling (else /v1/embeddings is a 400)
    base_args: tuple[str, ...]  # flags that do not depend on a request's requirements
    extra_args: tuple[str, ...]  # from the config, last so they win
    env: tuple[tuple[str, str], ...]
    capabilities: tuple[str, ...]

    @property
    def key(self) -> str:
        return self.entry.key

    @property
    def context_shift(self) -> bool:
        """Whether the configured args turn llama-server's context shift on (the last flag wins)."""
        flags = [arg for arg in self.extra_args if arg in ("--context-shift", "--no-context-shift")]
        return bool(flags) and flags[-1] == "--context-shift"

    @property
    def name(self) -> str:
        return self.entry.name

    def context_size(self, requirements: Requirements) -> int:
        """Context per request: the largest asked for, else configured; never above max_ctx (for what a request
        asks) nor above what the model was trained for."""
        asked = requirements.ctx_size or 0
        if self.max_ctx is not None:
            asked = min(asked, max(self.max_ctx, self.configured_ctx))
        wanted = max(self.configured_ctx, asked)
        return min(wanted, self.trained_ctx) if self.trained_ctx else wanted

    def check_limits(self, ctx_size: int | None, num_predict: int | None) -> None:
        """With ``over_limit: refuse``, a request above max_ctx or max_predict is a 400 that names the limit;
        otherwise it is clamped (context_size here, proxy/limits.py in the gateway)."""
        if not self.refuse_over_limit:
            return
        ctx_limit = None if self.max_ctx is None else max(self.max_ctx, self.configured_ctx)
        if ctx_size is not None and ctx_limit is not None and ctx_size > ctx_limit:
            raise BadRequest(
                f"num_ctx {ctx_size} is above the most model '{self.name}' allows per request "
                f"({ctx_limit}, max_ctx in the config)"
            )
        if num_predict is not None and self.max_predict is not None and num_predict > self.max_predict:
            raise BadRequest(
                f"num_predict {num_predict} is above the most model '{self.name}' generates per request "
                f"({self.max_predict}, max_predict in the config)"
            )

    def effective(self, wanted: Requirements) -> Requirements:
        """Requirements with the context the backend would really get (configured, raised by a request's
        num_ctx, capped at what the model was trained for), so that comparisons are between real sizes:
        a request for less than the backend runs with, or for more than the model supports, restarts
        nothing. A context the config chose (not a request) is taken from the current config, so a
        backend left by a run with another config is not adopted."""
        embeddings = wanted.embeddings or self.embeddings_always
        asked = wanted.ctx_size if wanted.ctx_requested else None
        ctx = self.context_size(Requirements(embeddings, asked))
        return Requirements(embeddings, ctx, wanted.ctx_requested)

    def spec(self, requirements: Requirements) -> LaunchSpec:
        """What llama-server is asked to do for these requirements; the runtime adds how (binary, host, port)."""
        parallel = self.policy.max_concurrent
        # -c is the total KV size shared by the slots: each request gets ctx tokens (Ollama's num_ctx).
        args = ["--ctx-size", str(self.context_size(requirements) * parallel), "--parallel", str(parallel)]
        if self.max_predict is not None:
            # llama-server's default for a request that names no limit (or -1); the gateway lowers a request's
            # own larger n_predict / max_tokens (proxy/limits.py), which llama-server would serve as asked.
            args += ["--n-predict", str(self.max_predict)]
        args += self.base_args
        if requirements.embeddings or self.embeddings_always:
            args.append("--embeddings")
            if self.needs_pooling:
                args += ["--pooling", "mean"]
        args += self.extra_args
        entry = self.entry
        return LaunchSpec(
            model=entry.key,
            model_file=entry.path,
            args=("--alias", entry.name, *args),
            mmproj=entry.config.mmproj if entry.config else None,
            gpus=self.gpus,
            env=dict(self.env),
            fingerprint=entry.fingerprint,
            labels=requirements.as_labels(),
            placement=Placement.of(entry.config),
        )


def _policy(entry: CatalogEntry, config: Config) -> ModelPolicy:
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
        drain_timeout=config.gateway.drain_timeout,
        # Gateways reconnect within a second and report within an interval: two, and a second's margin.
        adoption_settle=2 * config.gateway.report_interval + 1.0,
    )


def build_profile(entry: CatalogEntry, config: Config, supported_flags: Collection[str] = ()) -> ModelProfile:
    model, meta = entry.config, entry.metadata
    chosen = model.gpus if model is not None and model.gpus is not None else config.defaults.gpus
    gpus: GpuSelection = chosen if isinstance(chosen, str) else tuple(chosen)
    if gpus == "none":
        budget_gpus: tuple[str, ...] = ()
    elif gpus in ("all", "auto"):
        budget_gpus = tuple(sorted(config.scheduling.gpu_memory))  # every GPU that has a budget
    else:
        budget_gpus = tuple(str(gpu) for gpu in gpus)
    n_gpu_layers = model.n_gpu_layers if model and model.n_gpu_layers is not None else config.defaults.n_gpu_layers
    if gpus == "none":
        n_gpu_layers = 0
    base: list[str] = []
    if "--no-webui" in supported_flags:
        base.append("--no-webui")
    if "--metrics" in supported_flags:
        base.append("--metrics")  # re-exported by the controller's /metrics with a model label
    reranker = bool(model and model.reranking) or (meta is not None and meta.pooling_type == _POOLING_RANK)
    if reranker:
        base.append("--reranking")
    if n_gpu_layers is not None:
        base += ["--n-gpu-layers", str(n_gpu_layers)]
    extra = [*config.defaults.args, *(model.args if model else [])]
    if meta and not meta.chat_template and meta.architecture.startswith("gemma") and "--chat-template" not in extra:
        # Gemma GGUFs often ship without a template; llama-server would fall back to ChatML, which Gemma
        # does not know. Its built-in "gemma" format is the model's own, but built-in names only work with
        # Jinja off: with Jinja on (the default) "gemma" is read as a template and every prompt becomes "gemma".
        base += ["--no-jinja", "--chat-template", "gemma"]
    return ModelProfile(
        entry=entry,
        policy=_policy(entry, config),
        gpus=gpus,
        budget_gpus=budget_gpus,
        memory=model.memory if model and model.memory else entry.size,
        configured_ctx=model.ctx_size if model and model.ctx_size else config.defaults.ctx_size,
        trained_ctx=meta.context_length if meta else None,
        max_ctx=model.max_ctx if model and model.max_ctx else config.defaults.max_ctx,
        max_predict=model.max_predict if model and model.max_predict else config.defaults.max_predict,
        refuse_over_limit=config.defaults.over_limit == "refuse",
        n_gpu_layers=n_gpu_layers,
        embeddings_always=bool(model and model.embeddings),
        needs_pooling=meta is None or meta.pooling_type is None,
        base_args=tuple(base),
        extra_args=tuple(extra),
        env=tuple(sorted(config.llama_server.env.items())),
        capabilities=capabilities(entry),
    )
