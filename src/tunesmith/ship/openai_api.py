"""OpenAI's API as tunesmith serve speaks it: the request and reply bodies (pydantic models, from which
FastAPI writes the OpenAPI document), the error object, and the sentence each invalid field gets.

A request field tunesmith does not implement accepts only the value that means "not used" (clients send
some of them by default); any other value is refused, rather than silently ignored.  Unknown fields
(`user`, `metadata`, ...) are ignored, as OpenAI's own server does with fields it does not know.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
)
from pydantic_core import PydanticCustomError

MAX_STOP_SEQUENCES = 4  # OpenAI's API reference allows up to 4 stop sequences
SHOWN_CHARS = 80  # a value a client sent is quoted in an error message up to this many characters
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class RequestError(Exception):
    """A request the server refuses, sent back as OpenAI's error object with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --- requests --------------------------------------------------------------------------------------

LONE_SURROGATE_ERRORS = {"lone_surrogate", "string_unicode"}  # ours (below), and pydantic-core's own for some strings


def _unicode(text: str) -> str:
    """JSON can spell a lone surrogate ("\\ud800"), which is not text: no tokenizer reads it, no UTF-8
    reply can quote it.  Every string a request gives is checked, so none gets further."""
    try:
        text.encode()
    except UnicodeEncodeError:
        raise PydanticCustomError("lone_surrogate", "a lone surrogate (\\ud800 to \\udfff) is not text") from None
    return text


Text = Annotated[StrictStr, AfterValidator(_unicode)]
NonEmptyText = Annotated[StrictStr, Field(min_length=1), AfterValidator(_unicode)]


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"] = Field(description="developer is read as system")
    content: Text | list[TextPart] = Field(description="text, or a list of text parts (joined)")


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class TextFormat(BaseModel):
    type: Literal["text"]


def _integral(value):
    """JSON Schema's integers include 5.0 (but not true or "5")."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# (the bounds go inside, before the validator, so that the OpenAPI document shows them)
AtLeastOne = Annotated[StrictInt, Field(ge=1), BeforeValidator(_integral)]
OnlyOne = Annotated[StrictInt, Field(ge=1, le=1), BeforeValidator(_integral)]
OnlyZero = Annotated[StrictInt, Field(ge=0, le=0), BeforeValidator(_integral)]
Seed = Annotated[StrictInt, Field(ge=-(2**63)), BeforeValidator(_integral)]
NOT_SUPPORTED = "not supported by tunesmith serve: leave it out, or send the value that means unused"


class GenerationFields(BaseModel):
    """What /v1/chat/completions and /v1/completions both read."""

    # stream_options wants stream: true (JSON Schema's dependentSchemas says so in the OpenAPI document)
    model_config = ConfigDict(json_schema_extra={"dependentSchemas": {"stream_options": {
        "properties": {"stream": {"const": True}}, "required": ["stream"]}}})

    model: Text | None = Field(None, description="the id GET /v1/models lists; left out, the model served")
    max_tokens: AtLeastOne | None = Field(None, description="at most the server's --max-tokens-limit")
    max_completion_tokens: AtLeastOne | None = Field(None, description="OpenAI's newer name for max_tokens")
    temperature: StrictFloat | None = Field(None, ge=0, le=2, description="0 answers greedily; default 1")
    top_p: StrictFloat | None = Field(None, ge=0, le=1)
    n: OnlyOne | None = Field(None, description="one choice per request")
    stream: StrictBool = False
    stream_options: StreamOptions | None = Field(None, description="only with stream: true")
    stop: NonEmptyText | Annotated[list[NonEmptyText], Field(max_length=MAX_STOP_SEQUENCES)] | None = Field(
        None, description="strings that end the reply (the reply stops before the first one it contains)")
    seed: Seed | None = Field(None, description="makes a sampled reply repeatable")
    logit_bias: dict[str, Any] | None = Field(None, max_length=0, description=NOT_SUPPORTED)
    presence_penalty: StrictFloat | None = Field(None, ge=0, le=0, description=NOT_SUPPORTED)
    frequency_penalty: StrictFloat | None = Field(None, ge=0, le=0, description=NOT_SUPPORTED)


class ChatCompletionRequest(GenerationFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: Literal[False] | None = Field(None, description=NOT_SUPPORTED)
    top_logprobs: OnlyZero | None = Field(None, description=NOT_SUPPORTED)
    tools: list[Any] | None = Field(None, max_length=0, description=NOT_SUPPORTED)
    tool_choice: Literal["none"] | None = Field(None, description=NOT_SUPPORTED)
    functions: list[Any] | None = Field(None, max_length=0, description=NOT_SUPPORTED)
    function_call: Literal["none"] | None = Field(None, description=NOT_SUPPORTED)
    response_format: TextFormat | None = Field(None, description=NOT_SUPPORTED + " (only text)")


class CompletionRequest(GenerationFields):
    prompt: NonEmptyText | Annotated[list[NonEmptyText], Field(min_length=1, max_length=1)] = Field(
        description="one string (or a list holding one)")
    logprobs: OnlyZero | None = Field(None, description=NOT_SUPPORTED)
    echo: Literal[False] | None = Field(None, description=NOT_SUPPORTED)
    best_of: OnlyOne | None = Field(None, description=NOT_SUPPORTED)
    suffix: Literal[""] | None = Field(None, description=NOT_SUPPORTED)


TEXT_FIELDS = {"model", "messages", "content", "text", "stop", "prompt"}  # where a request holds strings
UNSUPPORTED_FIELDS = {"logit_bias", "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "tools",
                      "tool_choice", "functions", "function_call", "response_format", "echo", "best_of", "suffix"}
FinishReason = Literal["stop", "length"]


# --- replies ---------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# One server-sent event, as schemathesis and other OpenAPI 3.1 readers take a text/event-stream schema.
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {
    "type": "string", "description": "a chunk (chat.completion.chunk or text_completion) as JSON; an error "
    "object if generation was cut short; `[DONE]` last"}}}


# --- refusing invalid requests --------------------------------------------------------------------


def quoted(value) -> str:
    """A value a client sent, as JSON for an error message: escaped to ASCII (a lone surrogate, which no
    UTF-8 reply can carry, included) and cut to SHOWN_CHARS characters, however long or deep it was."""
    if isinstance(value, str):
        value = value[:SHOWN_CHARS + 1]
    try:
        text = json.dumps(value, default=str)
    except (RecursionError, ValueError):  # nested too deep to write out
        text = f"a deeply nested {type(value).__name__}"
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."


def _param(loc: tuple) -> str:
    """A pydantic location inside the body as OpenAI names a parameter: ("messages", 0, "role") -> messages[0].role."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def refusal(errors: list[dict]) -> RequestError:
    """The first of FastAPI's validation errors as the sentence (and `param`) tunesmith answers with; a
    lone surrogate anywhere first (a union's other branch may have failed first, for another reason)."""
    surrogate = next((e for e in errors if e["type"] in LONE_SURROGATE_ERRORS), None)
    if surrogate is not None:
        # the location without pydantic's names for a union's branches ("str", "list[TextPart]", ...)
        param = _param(tuple(p for p in surrogate["loc"][1:] if isinstance(p, int) or p in TEXT_FIELDS))
        return RequestError(400, f"`{param}` holds a lone surrogate (\\ud800 to \\udfff), which is not text; "
                            "send valid UTF-8.", param=param)
    error = errors[0]
    loc, kind, value = tuple(error["loc"][1:]), error["type"], error.get("input")
    if kind == "json_invalid":
        return RequestError(400, f"The request body is not valid JSON ({error.get('ctx', {}).get('error', kind)}).",
                            code="invalid_json")
    if not loc and isinstance(value, bytes):  # FastAPI reads JSON only from a body said to be JSON
        return RequestError(400, "Send the body as JSON, with the header `Content-Type: application/json`.",
                            code="invalid_json")
    if not loc or error["loc"][0] != "body":
        return RequestError(400, "The request body must be a JSON object.", code="invalid_json")
    name, shown = loc[0], quoted(value)
    if name == "messages":
        if len(loc) >= 3 and loc[2] == "content":
            return RequestError(400, f"`messages[{loc[1]}].content` must be a string or a list of text parts "
                                "(images, audio and tool calls are not supported).", param=_param(loc[:3]))
        if len(loc) >= 2 and isinstance(loc[1], int):
            return RequestError(400, f"`messages[{loc[1]}].role` must be one of {', '.join(CHAT_ROLES)}.",
                                param=f"messages[{loc[1]}].role")
        return RequestError(400, "`messages` is required: a non-empty list of {\"role\", \"content\"} objects.",
                            param="messages")
    if name == "prompt":
        return RequestError(400, "`prompt` is required: one string (token-id prompts and several prompts at once "
                            "are not supported).", param="prompt")
    if name in UNSUPPORTED_FIELDS:
        return RequestError(400, f"`{name}` is not supported by tunesmith serve; leave it out.", param=name,
                            code="unsupported_parameter")
    if name in ("max_tokens", "max_completion_tokens", "seed"):
        if kind == "greater_than_equal":
            return RequestError(400, f"`{name}` is {shown}; give a value of at least {error['ctx']['ge']}.",
                                param=name)
        return RequestError(400, f"`{name}` must be an integer, not {shown}.", param=name)
    if name in ("temperature", "top_p"):
        high = 2 if name == "temperature" else 1
        return RequestError(400, f"`{name}` must be a number from 0 to {high}, not {shown}.", param=name)
    sentences = {
        "n": "`n` must be 1: tunesmith serve generates one choice per request.",
        "stream": "`stream` must be true or false.",
        "stream_options": '`stream_options` must be an object like {"include_usage": true}.',
        "stop": f"`stop` must be a non-empty string or a list of at most {MAX_STOP_SEQUENCES} non-empty strings.",
        "model": "`model` must be a string: the id GET /v1/models lists.",
    }
    return RequestError(400, sentences.get(name, f"`{_param(loc)}`: {error['msg']}."), param=name)
