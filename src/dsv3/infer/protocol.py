"""OpenAI's wire format for `dsv3 serve`: request and response bodies as pydantic models, and
errors in OpenAI's JSON shape {"error": {"message", "type", "param", "code"}}.

Requests are validated completely before any work starts: strict types (no "2" for 2), unknown
fields rejected, every number within the range the engine can use (a top_k of 2**64 is a 400
here, not an overflow in the engine's tensors; infinities and NaN are refused), every string
valid Unicode (a lone UTF-16 surrogate such as "\\ud800", which JSON can carry but no tokenizer
can encode, is a 400 naming the field), at most MAX_STOP_STRINGS stop strings of at most
MAX_STOP_CHARS characters each. `validation_error` turns pydantic's error list into one 400 whose
`param` names the field ("messages[0].role"), and `APIError.response` renders every error as
ASCII-safe JSON, so that no input, however odd, can break the error path itself.

Responses are the shapes of OpenAI's API. Fields that OpenAI leaves out when they have no value
(a chat delta's role or content, a chunk's usage) are `Omitted`: dropped from the JSON when None.

Log-probabilities come in OpenAI's two shapes. A completion (`logprobs`: 0..5) has per token
`tokens`, `token_logprobs`, `top_logprobs` (a dict of the `logprobs` most likely tokens, plus the
chosen one: up to logprobs + 1 entries) and `text_offset` (where the token's text starts in the
choice's text); with `echo` the prompt's tokens come first, the very first with null logprob and
top_logprobs, as it has no context. A chat (`logprobs: true`, `top_logprobs`: 0..20) has
`content`: per token {token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}.
"""

from __future__ import annotations

import json
from typing import Annotated, Generic, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse

from dsv3.infer.sampling import INT64_MAX, MAX_REPETITION_PENALTY, MIN_REPETITION_PENALTY

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_STOP_CHARS = 1024  # per stop string; matching is linear in the text, this bounds memory and the body
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limits: completions' logprobs, chat's top_logprobs
MAX_TOP_LOGPROBS = 20


# ---------------------------------------------------------------------------------- errors
class APIError(Exception):
    """An error returned to the client as OpenAI's JSON error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return ErrorJSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ErrorJSONResponse(JSONResponse):
    """JSON with non-ASCII characters escaped: an error message may quote the client's input,
    and input can hold lone surrogates, which have no UTF-8 encoding."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def server_error(message: str, code: str | None = None, status: int = 500) -> APIError:
    return APIError(status, message, type="server_error", code=code)


def unavailable(message: str) -> APIError:
    return server_error(message, code="engine_unavailable", status=503)


EXPECTED = {  # what a union field accepts, for its error message
    "prompt": "a string, a list of token ids, or a list holding one string or one list of token ids",
    "stop": f"a string or a list of up to {MAX_STOP_STRINGS} strings",
    "content": "a string or a list of text parts",
}
UNSUPPORTED = (  # (field, the values we support, message)
    ("n", (1,), "n > 1 is not supported; send one request per choice"),
    ("best_of", (None, 1), "best_of > 1 is not supported"),
    ("suffix", (None,), "suffix is not supported"),
    ("presence_penalty", (0.0,), "presence_penalty is not supported (use repetition_penalty)"),
    ("frequency_penalty", (0.0,), "frequency_penalty is not supported (use repetition_penalty)"),
)


def _param(loc: tuple) -> str | None:
    """pydantic's error location -> OpenAI's param ("messages[0].role"); union tags dropped."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier() and part not in ("str", "int", "float", "bool", "list", "dict", "none"):
            out += f".{part}" if out else part
        else:
            break
    return out or None


def validation_error(errors: list[dict]) -> APIError:
    """FastAPI's RequestValidationError -> one OpenAI-style 400. Of a union's failed branches, the
    one whose type matched tells what is wrong (a lone surrogate in a string prompt); when every
    branch failed on its type, the message lists what the field accepts."""
    if not errors:
        return APIError(400, "The request body must be a JSON object", code="invalid_body")
    specific = [x for x in errors if not x["type"].endswith("_type")]
    e = (specific or errors)[0]
    if e["type"] == "json_invalid":
        detail = (e.get("ctx") or {}).get("error", "")
        return APIError(
            400, f"We could not parse the JSON body of your request: {detail}", code="invalid_json"
        )
    param = _param(tuple(e["loc"]))
    if param is None:
        return APIError(400, "The request body must be a JSON object", code="invalid_body")
    if e["type"] == "extra_forbidden":
        return APIError(
            400, f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter"
        )
    if e["type"] == "missing":
        return APIError(
            400, f"Missing required parameter: '{param}'", param=param, code="missing_required_parameter"
        )
    message = f"Invalid value for '{param}': {e['msg'].removeprefix('Value error, ')}"
    field = param.split(".")[-1].split("[")[0]
    if (
        not specific
        and len(errors) > 1
        and field in EXPECTED
        and all(_param(tuple(x["loc"])) == param for x in errors)
    ):
        message = f"Invalid value for '{param}': expected {EXPECTED[field]}"  # every branch of a union failed
    return APIError(400, message, param=param, code="invalid_value")


# ---------------------------------------------------------------------------------- field types
def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"contains a lone UTF-16 surrogate (U+{ord(text[e.start]):04X}) at character {e.start}; "
            "send valid Unicode text"
        ) from None
    return text


def _stop_string(text: str) -> str:
    if not 1 <= len(text) <= MAX_STOP_CHARS:
        raise ValueError(f"a stop string must have 1 to {MAX_STOP_CHARS} characters, not {len(text)}")
    return _valid_unicode(text)


Text = Annotated[str, AfterValidator(_valid_unicode)]
Stop = Annotated[str, AfterValidator(_stop_string)]
Int64 = Annotated[int, Field(ge=0, le=INT64_MAX)]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# ---------------------------------------------------------------------------------- requests
class StreamOptions(Body):
    include_usage: bool = False


class CommonRequest(Body):
    model: Text
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, le=INT64_MAX)  # extension (vLLM's); 0 = off
    repetition_penalty: float = Field(1.0, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)  # vLLM's
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: int | None = Field(None, ge=0, le=INT64_MAX)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[Text, float] | None = None
    user: Text | None = None
    ignore_eos: bool = False  # extension

    @property
    def stops(self) -> tuple[str, ...]:
        return () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(CommonRequest):
    prompt: Text | list[Int64] | list[Text] | list[list[Int64]]
    max_tokens: int | None = Field(16, ge=0)  # 0: score the prompt only (with echo and logprobs)
    best_of: int | None = None
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    suffix: Text | None = None


class TextPart(Body):
    type: Literal["text"]
    text: Text


class Message(Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None


class ChatRequest(CommonRequest):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


# ---------------------------------------------------------------------------------- responses
def omitted(default=None):
    """A field left out of the JSON while it is None."""
    return Field(default, exclude_if=lambda v: v is None)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        total = prompt_tokens + completion_tokens
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=total)


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]

    def __add__(self, other: CompletionLogprobs) -> CompletionLogprobs:
        """These tokens' logprobs followed by other's."""
        return CompletionLogprobs(
            **{k: getattr(self, k) + getattr(other, k) for k in type(self).model_fields}
        )


Logprobs = TypeVar("Logprobs")
ChoiceT = TypeVar("ChoiceT")


class Choice(BaseModel, Generic[Logprobs]):
    """What every choice of a response or chunk carries."""

    index: int = 0
    logprobs: Logprobs | None = None
    finish_reason: str | None


class Envelope(BaseModel, Generic[ChoiceT]):
    """What every completion response and chunk carries (usage: in the final one, if asked)."""

    id: str
    created: int
    model: str
    choices: list[ChoiceT]
    usage: Usage | None = omitted()


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Delta(BaseModel):
    role: Literal["assistant"] | None = omitted()
    content: str | None = omitted()


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]  # the token's text in UTF-8


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class CompletionChoice(Choice[CompletionLogprobs]):
    text: str


class ChatChoice(Choice[ChatLogprobs]):
    message: ChatMessage


class ChatChunkChoice(Choice[ChatLogprobs]):
    delta: Delta


class CompletionResponse(Envelope[CompletionChoice]):
    """A completion, and also each chunk of a streamed one (OpenAI uses the same object)."""

    object: Literal["text_completion"] = "text_completion"


class ChatCompletionResponse(Envelope[ChatChoice]):
    object: Literal["chat.completion"] = "chat.completion"
    usage: Usage


class ChatCompletionChunk(Envelope[ChatChunkChoice]):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "dsv3"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def sse(event: BaseModel | dict) -> str:
    """One server-sent event."""
    data = event.model_dump_json() if isinstance(event, BaseModel) else json.dumps(event)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"
