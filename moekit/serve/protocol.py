"""The OpenAI request bodies of ``/v1/completions`` and ``/v1/chat/completions``, validated, their conversion into
:class:`~moekit.serve.sampling.SamplingParams`, and the OpenAI-shaped error JSON.

Fields follow OpenAI's API; unknown fields are ignored, as OpenAI ignores them. Extensions, as vLLM spells them:
``top_k`` (0 or -1: off), ``ignore_eos``, ``stop_token_ids`` and ``return_token_ids`` (each choice also carries its
``token_ids``, and ``prompt_token_ids``). What this server does not do is an error, never silently ignored:
``logprobs``/``top_logprobs``, ``echo``, ``suffix``, ``best_of`` > 1, a non-empty ``logit_bias``, ``tools``, a
``response_format`` other than text. Every error names the field (``param``) and the value it got.

Types are strict (``"5"`` is not an integer, ``1`` is not a boolean) and numbers finite; a number given as
``null`` takes its default. pydantic comes with FastAPI (the ``[serve]`` extra).
"""

from __future__ import annotations

from typing import Annotated, Any

from moekit.serve.sampling import SamplingParams

SERVE_EXTRA = "pip install 'moekit[serve]'"

try:
    from pydantic import (
        BaseModel,
        ConfigDict,
        Field,
        StrictBool,
        StrictInt,
        StrictStr,
        ValidationError,
        field_validator,
    )
except ImportError as e:  # the extra is optional: say exactly how to get it
    raise ImportError(f"moekit's server needs FastAPI, uvicorn and jinja2: {SERVE_EXTRA}") from e

MAX_N = 128  # choices per request, OpenAI's bound
_SHOWN = 120  # characters of a bad value repeated in an error message


class RequestError(ValueError):
    """A request the server answers with an OpenAI-shaped error: ``status``, ``message`` naming ``param``."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.type = message, param, status, code, type

    def body(self) -> dict:
        return error_body(self.message, self.param, self.code, self.type)


def error_body(message: str, param: str | None = None, code: str | None = None,
               type: str = "invalid_request_error") -> dict:
    """``{"error": {"message", "type", "param", "code"}}``, as OpenAI answers an error."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def shown(value: Any) -> str:
    """``repr(value)``, cut to a length an error message can repeat."""
    text = repr(value)
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


def request_error_of(errors: list[dict], skip: tuple[str, ...] = ("body",)) -> RequestError:
    """The first of pydantic's (or FastAPI's ``RequestValidationError``'s) errors as a 400 naming the field.

    ``skip``: leading location parts that are not field names (FastAPI puts the body under ``"body"``)."""
    if not errors:
        return RequestError("the request body is not valid")
    err = errors[0]
    loc = list(err.get("loc", ()))
    while loc and loc[0] in skip:
        loc.pop(0)
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
    kind, msg = err.get("type", ""), str(err.get("msg", "is not valid"))
    if kind == "json_invalid":
        return RequestError(f"the request body is not valid JSON ({err.get('ctx', {}).get('error', msg)})")
    if kind == "missing":
        return RequestError(f"{param or 'body'}: is required", param)
    msg = msg.removeprefix("Value error, ")
    msg = msg[:1].lower() + msg[1:]
    return RequestError(f"{param or 'body'}: {msg}, got {shown(err.get('input'))}", param)


def parse_request(cls: type[BaseModel], data: Any) -> Any:
    """``cls`` validated from a decoded JSON body; a bad field raises :class:`RequestError` naming it."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise request_error_of(e.errors(include_url=False), skip=()) from None


# strict, finite numbers; None: the default
_Int = Annotated[StrictInt, Field(strict=True)]
Temperature = Annotated[float, Field(strict=True, ge=0, le=2, allow_inf_nan=False)]
TopP = Annotated[float, Field(strict=True, gt=0, le=1, allow_inf_nan=False)]
Penalty = Annotated[float, Field(strict=True, ge=-2, le=2, allow_inf_nan=False)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool | None = False


class _Common(BaseModel):
    """The fields the two endpoints share, and their conversion into SamplingParams."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None  # None: the served model
    max_tokens: Annotated[_Int, Field(ge=1)] | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: Annotated[_Int, Field(ge=-1)] | None = None
    n: Annotated[_Int, Field(ge=1, le=MAX_N)] | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    stop: Any = None  # a string or a list of strings
    seed: Annotated[_Int, Field(ge=0, lt=2**63)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Any] | None = None
    user: StrictStr | None = None
    ignore_eos: StrictBool | None = False
    stop_token_ids: list[Annotated[_Int, Field(ge=0)]] | None = None
    return_token_ids: StrictBool | None = False

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v):
        if v is not None and not (isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v))):
            raise ValueError("must be a string or a list of strings")
        if any(not s for s in ([v] if isinstance(v, str) else v or [])):
            raise ValueError("every stop sequence must be a non-empty string")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, v):
        if v:
            raise ValueError("is not supported by this server")
        return v

    @property
    def choices_per_prompt(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def check_stream_options(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options: only allowed when stream is true, got stream "
                               f"{shown(self.stream)}", "stream_options")

    def sampling_params(self, max_tokens: int, extra_stop: tuple[str, ...] = ()) -> SamplingParams:
        """The engine's parameters of one choice (``seed`` as given: the server adds the choice index).

        ``max_tokens``: the value to use (the request's, or the endpoint's default); ``extra_stop``: stop strings
        of the chat template."""
        self.check_stream_options()
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if self.temperature is None else float(self.temperature),
                top_p=1.0 if self.top_p is None else float(self.top_p),
                top_k=max(self.top_k or 0, 0), seed=self.seed,
                stop=tuple(dict.fromkeys([*stop, *extra_stop])),
                stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=bool(self.ignore_eos),
                presence_penalty=float(self.presence_penalty or 0.0),
                frequency_penalty=float(self.frequency_penalty or 0.0))
        except ValueError as e:  # SamplingParams names the field first: "top_p: must be ..."
            field = str(e).split(":", 1)[0]
            raise RequestError(str(e), field if field.isidentifier() else None) from None


def _unsupported(value, off: tuple) -> Any:
    """``value`` when it is one of ``off`` (the feature not asked for); else the field's error."""
    if any(value is o or (type(value) is type(o) and value == o) for o in off):
        return value
    raise ValueError("is not supported by this server")


class CompletionRequest(_Common):
    """``POST /v1/completions``. ``prompt``: a string, a list of strings, a list of token ids or a list of lists of
    token ids (each list one prompt)."""

    prompt: Any
    suffix: StrictStr | None = None
    echo: StrictBool | None = False
    logprobs: _Int | None = None
    best_of: Annotated[_Int, Field(ge=1)] | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, v):
        expected = "must be a string, a list of strings, a list of token ids or a list of lists of token ids"
        if isinstance(v, str):
            return v
        if not isinstance(v, list) or not v:
            raise ValueError(expected if not isinstance(v, list) else "must not be an empty list")
        if all(isinstance(p, str) for p in v):
            return v
        if all(_is_id(t) for t in v):
            return v
        if all(isinstance(p, list) and p and all(_is_id(t) for t in p) for p in v):
            return v
        raise ValueError(expected + " (token ids: integers >= 0, each list non-empty)")

    @field_validator("suffix", "echo", "logprobs")
    @classmethod
    def _not_supported(cls, v):  # (an empty suffix, echo false and logprobs null are what OpenAI does by default)
        return _unsupported(v, off=(None, False, ""))

    @field_validator("best_of")
    @classmethod
    def _one_best_of(cls, v):
        return _unsupported(v, off=(None, 1))

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: its text or its token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and all(_is_id(t) for t in p)):
            return [p]
        return list(p)


class ChatCompletionRequest(_Common):
    """``POST /v1/chat/completions``. ``messages`` are checked by ``moekit.serve.chat``; ``max_completion_tokens`` is
    OpenAI's newer name for ``max_tokens`` (given both, they must agree)."""

    messages: list[Any]
    max_completion_tokens: Annotated[_Int, Field(ge=1)] | None = None
    logprobs: StrictBool | None = False
    top_logprobs: _Int | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("logprobs", "top_logprobs")
    @classmethod
    def _not_supported(cls, v):
        return _unsupported(v, off=(None, False))

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v):
        return _unsupported(v or None, off=(None,))

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v):
        if v is not None and v.get("type", "text") != "text":
            raise ValueError("only {'type': 'text'} is supported by this server")
        return v

    def max_tokens_asked(self) -> int | None:
        a, b = self.max_tokens, self.max_completion_tokens
        if a is not None and b is not None and a != b:
            raise RequestError(f"max_completion_tokens: differs from max_tokens ({b} against {a}); give one",
                               "max_completion_tokens")
        return b if b is not None else a


def _is_id(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0
