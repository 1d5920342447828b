"""Inference verbs: `generate`, `chat` and `serve` (the OpenAI-compatible gateway)."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from lmforge.cli.common import ConfigArgs, build_config, flags, split_list
from lmforge.errors import ConfigError

Model = Annotated[str, typer.Argument(help="model dir, run dir, checkpoint dir or Hub id org/name[@revision]")]
Device = Annotated[str, typer.Option(help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")]
Compile = Annotated[bool, typer.Option(help="torch.compile the decode step")]


def _engine_and_params(model: str, device: str, compile: bool, **sampling):
    """The inference engine (one sequence) on MODEL and validated sampling parameters."""
    from lmforge.serve.config import EngineConfig
    from lmforge.serve.engine import Engine
    from lmforge.serve.sampling import SamplingParams

    try:
        params = SamplingParams(**sampling)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    engine = Engine.from_path(model, EngineConfig(max_num_seqs=1, device=device, compile=compile))
    return engine, params


def generate(
    model: Model,
    prompt: Annotated[str, typer.Option(help="text to continue")] = "",
    max_tokens: int = 128,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: Annotated[list[str] | None, typer.Option(help="stop string (repeatable)")] = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    device: Device = "auto",
    compile: Compile = False,
):
    """Sample a continuation of PROMPT with the inference engine (KV cache, streaming)."""
    engine, params = _engine_and_params(model, device, compile, max_tokens=max_tokens, temperature=temperature,
                                        top_k=top_k, top_p=top_p, seed=seed, stop=stop or [],
                                        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty)
    with engine:
        handle = engine.submit(prompt, params)
        typer.echo(prompt, nl=False)
        for output in handle:
            typer.echo(output.text, nl=False)
        typer.echo()


def chat(
    model: Model,
    system: Annotated[str | None, typer.Option(help="system message")] = None,
    max_tokens: int = 256,
    temperature: float = 0.7,
    top_k: int | None = None,
    top_p: float = 0.95,
    seed: int | None = None,
    device: Device = "auto",
    compile: Compile = False,
):
    """Chat in the terminal (or over a pipe: one user turn per line). /reset clears, /exit quits."""
    from lmforge.chat import ChatSession

    engine, params = _engine_and_params(model, device, compile, max_tokens=max_tokens, temperature=temperature,
                                        top_k=top_k, top_p=top_p, seed=seed)
    session = ChatSession(engine, params, system)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            typer.echo("you> ", nl=False)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            break
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            session.reset()
            continue
        if not text.strip():
            continue
        typer.echo("assistant> ", nl=False)
        for piece in session.send(text):
            typer.echo(piece, nl=False)
        typer.echo()
    engine.shutdown(drain=False)


def serve(
    model: Model,
    args: ConfigArgs = None,
    host: Annotated[str | None, typer.Option(help="address to bind (server.host)")] = None,
    port: Annotated[int | None, typer.Option(help="port (server.port)")] = None,
    api_keys_file: Annotated[str | None, typer.Option(help="lines of name:key or name:sha256:HEX")] = None,
    api_key: Annotated[list[str] | None, typer.Option(
        "--api-key", help="an accepted key (repeatable; name:key or a bare key); also $LMFORGE_API_KEY")] = None,
    served_model_name: Annotated[str | None, typer.Option(help="the model id clients send (server.model_name)")] = None,
    device: Annotated[str | None, typer.Option(help="engine.device: auto, cpu, cuda")] = None,
    allow_unreleased: Annotated[bool, typer.Option(
        "--allow-unreleased", help="serve without a passing `lmforge release` record (allow_unreleased)")] = False,
    allowed_origins: Annotated[list[str] | None, typer.Option(
        help='CORS: origins browsers may call from (repeatable, comma-separated or a JSON list as vLLM\'s; "*": any)')] = None,
    allowed_methods: Annotated[list[str] | None, typer.Option(help="CORS: methods (cors.allowed_methods)")] = None,
    allowed_headers: Annotated[list[str] | None, typer.Option(help="CORS: request headers (cors.allowed_headers)")] = None,
    allow_credentials: Annotated[bool, typer.Option(
        "--allow-credentials", help="CORS: browsers may send cookies (cors.allow_credentials)")] = False,
    lora_modules: Annotated[list[str] | None, typer.Option(
        "--lora-modules", help="LoRA adapters to serve, name=path (repeatable or space-separated, as vLLM's; lora.adapters)")] = None,
):
    """OpenAI-compatible server: /v1/completions, /v1/chat/completions, /metrics, ... (Ctrl-C drains).

    The model needs a passing release record for its weights (`lmforge release MODEL --policy ...`)
    unless --allow-unreleased is given."""
    from lmforge.serve import server
    from lmforge.serve.config import ServeConfig

    given: dict[str, Any] = flags(model=model, allow_unreleased=allow_unreleased)  # ServeConfig nests the rest
    if host is not None or port is not None or served_model_name is not None:
        given["server"] = flags(host=host, port=port, model_name=served_model_name)
    if api_keys_file is not None or api_key:
        given["auth"] = flags(api_keys_file=api_keys_file, api_keys=api_key or None)
    if device is not None:
        given["engine"] = {"device": device}
    cors = flags(allowed_origins=_listed(allowed_origins), allowed_methods=_listed(allowed_methods),
                 allowed_headers=_listed(allowed_headers), allow_credentials=allow_credentials)
    if cors:
        given["cors"] = cors
    if lora_modules:
        # vLLM's `--lora-modules a=/x b=/y`: click leaves b=/y among the key=value overrides, where a
        # top-level key that ServeConfig lacks can only be another adapter.
        more = [a for a in args or [] if "=" in a and "." not in a.partition("=")[0]
                and a.partition("=")[0] not in ServeConfig.model_fields]
        args = [a for a in args or [] if a not in more]
        given["lora"] = {"adapters": _lora_modules([*lora_modules, *more])}
    server.run(build_config(ServeConfig, args, given))


def _lora_modules(values: list[str]) -> dict[str, str]:
    """vLLM's `--lora-modules name=path ...` (or its JSON form, {"name": ..., "path": ...}) as {name: path}."""
    adapters: dict[str, str] = {}
    for value in (v for item in values for v in ([item] if item.lstrip().startswith("{") else item.split())):
        value = value.strip()
        if value.startswith("{"):
            try:
                entry = json.loads(value)
                name, path = entry["name"], entry["path"]
            except (ValueError, KeyError, TypeError):
                raise ConfigError(f"--lora-modules: {value} is not name=path nor a JSON {{name, path}} object") from None
        else:
            name, sep, path = value.partition("=")
            if not sep or not name or not path:
                raise ConfigError(f"--lora-modules: {value!r} is not name=path")
        if name in adapters:
            raise ConfigError(f"--lora-modules: adapter name {name!r} is given twice")
        adapters[name] = path
    return adapters


def _listed(values: list[str] | None) -> list[str] | None:
    """Repeated, comma-separated or JSON-list values (vLLM's `--allowed-origins '["*"]'`) as one list."""
    if values and len(values) == 1 and values[0].lstrip().startswith("["):
        try:
            parsed = json.loads(values[0])
        except ValueError:
            raise ConfigError(f"not a JSON list of strings: {values[0]}") from None
        if not isinstance(parsed, list) or not all(isinstance(v, str) for v in parsed):
            raise ConfigError(f"not a JSON list of strings: {values[0]}")
        return parsed
    return split_list(values)
