"""Request bodies of the OpenAI-compatible API, values range-checked. Unknown fields fail validation
here; the parser (admission.parse_body) drops and logs them unless `server.strict_params`.

Every field has a bound, so no request can ask the server for unbounded work: strings and
lists here, and the limits that depend on the model or the config (`max_tokens`, `n`, prompt
tokens, token ids in the vocabulary, stop sequences) in the gateway. The body-size limit bounds
what is left (prompt and message text).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

NAME_CHARS = 256  # model, user and message names: identifiers, not text
STOP_CHARS = 512  # a stop sequence longer than this never ends a reply worth having
MAX_MESSAGES = 4096
MAX_TOOLS = 128  # OpenAI's bound on tools in a request
FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function names
DESCRIPTION_CHARS = 32_768
SEED_RANGE = (-(2**63), 2**63 - 1)  # what torch.Generator.manual_seed takes, with room for n offsets

# Strict: `true` or `1.0` is a client's mistake, not token id 1.
TokenIds = list[StrictInt]
Stop = Annotated[str, Field(max_length=STOP_CHARS)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaFormat(_Body):
    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    """OpenAI's `response_format`: plain text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Body):
    """vLLM's `structured_outputs`: exactly one of these constraints."""

    model_config = ConfigDict(extra="ignore")  # vLLM's backend switches (disable_fallback, ...) mean nothing here

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[Annotated[str, Field(max_length=STOP_CHARS)]] | None = Field(None, min_length=1, max_length=1024)
    grammar: str | None = None
    json_object: bool | None = None


class _Sampling(_Body):
    model: str = Field(max_length=NAME_CHARS)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1, description="vLLM extension; -1 or None: off")
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop | list[Stop] | None = Field(None)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    user: str | None = Field(None, max_length=NAME_CHARS)
    logit_bias: dict[str, float] | None = Field(None, max_length=300)  # OpenAI's own bound
    ignore_eos: bool = Field(False, description="vLLM extension: generate max_tokens whatever comes")
    min_p: float = Field(0.0, ge=0, le=1, description="vLLM extension")
    repetition_penalty: float = Field(1.0, gt=0, le=10, description="vLLM extension; 1: off")
    min_tokens: int = Field(0, ge=0, description="vLLM extension: no end of text before this many tokens")
    stop_token_ids: TokenIds | None = Field(None, max_length=64, description="vLLM extension")
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = Field(None, description="vLLM extension")
    # vLLM's older names for the same constraints
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[Annotated[str, Field(max_length=STOP_CHARS)]] | None = Field(None, min_length=1, max_length=1024)
    guided_grammar: str | None = None

    def stop_list(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stop if s]


class CompletionRequest(_Sampling):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = Field(None, max_length=STOP_CHARS)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str = Field(max_length=NAME_CHARS)
    arguments: str  # a JSON object, as text


class ToolCall(_Body):
    """A call an assistant made (in its reply, and in the messages a client sends back)."""

    id: str = Field(max_length=NAME_CHARS)
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(_Body):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = Field(None, max_length=DESCRIPTION_CHARS)
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None  # calls forced by tool_choice always match the schema; auto ones are not held to it


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Body):
    name: str = Field(max_length=NAME_CHARS)


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: FunctionName


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, max_length=NAME_CHARS)
    tool_calls: list[ToolCall] | None = Field(None, max_length=MAX_TOOLS)  # assistant turns
    tool_call_id: str | None = Field(None, max_length=NAME_CHARS)  # tool turns: the call answered

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages have tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        for call in self.tool_calls or []:
            try:
                arguments = json.loads(call.function.arguments)
            except ValueError:
                arguments = None
            if not isinstance(arguments, dict):
                raise ValueError(f"tool call {call.id[:64]!r} has arguments that are not a JSON object")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True


class TokenizeRequest(_Body):
    model: str | None = Field(None, max_length=NAME_CHARS)
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, max_length=MAX_MESSAGES)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)  # listed in the chat prompt, as vLLM's
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    model: str | None = Field(None, max_length=NAME_CHARS)
    tokens: TokenIds
