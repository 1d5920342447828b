"""`ServeConfig`: the engine, the HTTP gateway, its limits, API keys, audit log and moderation hook."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from lmforge.config import Section
from lmforge.device import DtypeName


class EngineConfig(Section):
    """The inference engine: batch of sequences, context, device and dtype, compile, backend (lmforge or vllm)."""

    max_num_seqs: int = Field(16, ge=1, description="sequences decoded together (KV-cache slots)")
    max_model_len: int | None = Field(None, ge=2, description="tokens per sequence; None: the model's context")
    prefill_chunk_tokens: int = Field(256, ge=1, description="prompt tokens computed per step, over all prefills")
    device: str = Field("auto", description="auto: cuda if available, else cpu")
    dtype: DtypeName = Field("auto", description="auto: bf16 on CUDA, fp32 on CPU")
    compile: bool = Field(False, description="torch.compile the blocks for decoding (falls back with a warning)")
    cpu_threads: int | None = Field(None, ge=1, description="`lmforge serve` on CPU: torch threads; None: every core "
                                    "this process may use but one, which the HTTP front end keeps (event loop, SSE)")
    stream_interval: int = Field(1, ge=1, description="tokens per streamed output after the first (vLLM's "
                                 "--stream-interval): larger sends fewer SSE events, less host work per token")
    backend: Literal["lmforge", "vllm"] = Field("lmforge", description="vllm: serve an exported model dir with vLLM (GPU)")
    vllm_args: dict[str, Any] = Field(default_factory=dict, description="backend vllm: extra vllm.AsyncEngineArgs keywords")


class ServerConfig(Section):
    """The HTTP server: address, port, served model name, shutdown and logging."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    model_name: str | None = Field(None, description="the id clients send as `model`; None: the model dir's name")
    graceful_shutdown_s: float = Field(30.0, ge=0, description="time running requests get to finish on shutdown")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    strict_params: bool = Field(False, description="refuse request fields the API does not know (400, as OpenAI); "
                                "default: ignore them, logging each name once (as vLLM)")
    responses_store_size: int = Field(
        512, ge=0, description="/v1/responses kept in memory for previous_response_id and GET (LRU); 0: none")
    embedding_pooling: Literal["mean", "last"] = Field(
        "mean", description="/v1/embeddings: the final hidden states averaged over the tokens, or the last token's")


class LimitsConfig(Section):
    """Per-request and queue limits: prompt and output tokens, body size, timeouts."""

    max_prompt_tokens: int | None = Field(None, ge=1, description="None: the model's context")
    max_tokens: int = Field(1024, ge=1, description="largest max_tokens a request may ask for")
    default_max_tokens: int | None = Field(
        None, ge=1, description="chat completions without max_tokens; None: the rest of the context, up to max_tokens")
    max_n: int = Field(8, ge=1, description="largest n (choices per request)")
    max_body_bytes: int = Field(1_000_000, ge=1024)
    max_queue: int = Field(128, ge=0, description="waiting requests before 503")
    request_timeout_s: float | None = Field(300.0, gt=0, description="a generation running longer is stopped")


class AuthConfig(Section):
    """API keys and per-key rate limits."""

    api_keys_file: str | None = Field(None, description="lines of `name:key` or `name:sha256:HEX`")
    api_keys_env: str = Field("LMFORGE_API_KEYS", description="env var with comma-separated `name:key` or keys")
    api_key_env: str = Field("LMFORGE_API_KEY", description="env var holding one key, taken whole (as VLLM_API_KEY)")
    api_keys: list[str] = Field(default_factory=list, repr=False,
                                description="keys given on the command line (--api-key, repeatable): `name:key` or a key")
    requests_per_minute: int | None = Field(None, ge=1, description="per key; None: unlimited")
    tokens_per_minute: int | None = Field(None, ge=1, description="prompt + max_tokens per key; None: unlimited")


class CorsConfig(Section):
    """Cross-origin requests from browsers (Starlette's CORSMiddleware), named as vLLM's flags.

    No origins by default: a browser page elsewhere cannot call the server (vLLM allows `*`)."""

    allowed_origins: list[str] = Field(default_factory=list, description='origins a browser may call from; ["*"]: any')
    allowed_methods: list[str] = Field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = Field(default_factory=lambda: ["*"])
    allow_credentials: bool = Field(False, description="let browsers send cookies (Access-Control-Allow-Credentials)")


class AuditConfig(Section):
    """The audit log of requests."""

    path: str | None = Field(None, description="SQLite file, e.g. serve_audit.sqlite; None: no audit log "
                             "(the default: serve writes nothing into the current dir unless asked)")


class ModerationConfig(Section):
    """A moderation policy in front of the model: what to check and what to do on a block."""

    policy: str | dict[str, Any] | None = Field(
        None, description="moderation policy YAML (configs/moderation.yaml) or its keys inline; None: no policy")
    hook: str | None = Field(None, description="`module:factory` returning your own moderator (instead of a policy)")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the hook's factory")
    on_block: Literal["error", "refusal"] = Field(
        "error", description="a blocked input: error -> HTTP 400 (code content_filter); refusal -> a 200 reply saying no")
    refusal_message: str = "I can't help with that request."
    stream_window_chars: int = Field(
        64, ge=1, description="streamed output is checked (and released) every this many characters")


class LoraConfig(Section):
    """LoRA adapters served over the model, each under its own name."""

    adapters: dict[str, str] = Field(
        default_factory=dict, description="LoRA adapters served over the model, {name: adapter dir}; a request's "
        "`model` picks one by name (`lmforge sft lora.enabled=true` writes RUN/adapter)")
    max_rank: int | None = Field(None, ge=1, description="refuse adapters of a higher rank; None: any")


class ServeConfig(Section):
    model: str = Field("", description="model dir, run dir or checkpoint")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    cors: CorsConfig = Field(default_factory=CorsConfig)
    moderation: ModerationConfig = Field(default_factory=ModerationConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    allow_unreleased: bool = Field(
        False, description="serve a model without a passing `lmforge release` record (for development)")

    @property
    def served_model_name(self) -> str:
        """The id clients send as `model` (and /metrics' `model_name`): server.model_name or the model dir's name."""
        return self.server.model_name or Path(self.model or "lmforge").name
