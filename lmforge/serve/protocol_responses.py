"""Request bodies of /v1/responses (OpenAI's Responses API) and /v1/embeddings, values range-checked.

As in `protocol`, unknown fields fail validation here and the parser drops and logs them
unless `server.strict_params`. Items a client sends back from an earlier reply (the Agents
SDK replays output items as input) carry `id`, `status`, `annotations`: those are accepted
and ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator

from lmforge.serve.protocol import MAX_MESSAGES, NAME_CHARS, TokenIds, _Body

MAX_EMBEDDING_INPUTS = 2048  # OpenAI's own bound on inputs per embeddings request


class InputText(_Body):
    type: Literal["input_text", "output_text", "text"]
    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class InputMessage(_Body):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputText]
    id: str | None = Field(None, max_length=NAME_CHARS)
    status: str | None = Field(None, max_length=NAME_CHARS)

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionCallItem(_Body):
    type: Literal["function_call"]
    call_id: str = Field(max_length=NAME_CHARS)
    name: str = Field(max_length=NAME_CHARS)
    arguments: str
    id: str | None = Field(None, max_length=NAME_CHARS)
    status: str | None = Field(None, max_length=NAME_CHARS)


class FunctionCallOutputItem(_Body):
    type: Literal["function_call_output"]
    call_id: str = Field(max_length=NAME_CHARS)
    output: str | list[InputText]
    id: str | None = Field(None, max_length=NAME_CHARS)
    status: str | None = Field(None, max_length=NAME_CHARS)

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


def _item_type(value: Any) -> str:
    return (value.get("type") if isinstance(value, dict) else getattr(value, "type", None)) or "message"


# Told apart by `type` (a message may leave it out), so a bad item is judged as what it says it is:
# its errors, and the unknown fields the parser drops, are that kind's alone.
InputItem = Annotated[
    Annotated[InputMessage, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(_item_type),
]


class FunctionTool(_Body):
    """A Responses function tool: flat, not nested under `function` as in chat completions."""

    type: Literal["function"]
    name: str = Field(max_length=NAME_CHARS)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolChoiceFunction(_Body):
    type: Literal["function"]
    name: str = Field(max_length=NAME_CHARS)


class TextFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, max_length=NAME_CHARS)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(_Body):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponsesRequest(_Body):
    model: str = Field(max_length=NAME_CHARS)
    input: list[InputItem] = Field(max_length=MAX_MESSAGES)  # a string is one user message
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    tools: list[FunctionTool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    parallel_tool_calls: bool | None = None
    stream: bool = False
    previous_response_id: str | None = Field(None, max_length=NAME_CHARS)
    store: bool = True
    text: TextConfig | None = None
    metadata: dict[str, str] | None = Field(None, max_length=16)  # OpenAI's own bound
    user: str | None = Field(None, max_length=NAME_CHARS)
    truncation: Literal["auto", "disabled"] | None = None  # a prompt past the context is a 400 either way
    # What else to put in the reply (reasoning, logprobs...); the Agents SDK always sends it. Nothing
    # this server could add is asked for by it, so it is accepted and changes nothing.
    include: list[str] | None = Field(None, max_length=16)

    @field_validator("input", mode="before")
    @classmethod
    def _text_input(cls, value: Any) -> Any:
        # As a list only, a bad item's error names the item, not "input is not a string".
        return [{"role": "user", "content": value}] if isinstance(value, str) else value


class EmbeddingRequest(_Body):
    model: str = Field(max_length=NAME_CHARS)
    input: str | list[str] | TokenIds | list[TokenIds]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = Field(None, max_length=NAME_CHARS)
