"""The OpenAI request bodies: what they accept, what they turn into SamplingParams, and one test per error (each names
the field and the value)."""

from __future__ import annotations

import pytest

pytest.importorskip("pydantic", reason="the server's request models need pydantic (pip install 'moekit[serve]')")

from moekit.serve.protocol import (  # noqa: E402
    ChatCompletionRequest,
    CompletionRequest,
    RequestError,
    error_body,
    parse_request,
    request_error_of,
)


def completion(**fields) -> CompletionRequest:
    return parse_request(CompletionRequest, {"prompt": "hi", **fields})


def chat(**fields) -> ChatCompletionRequest:
    return parse_request(ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}], **fields})


@pytest.mark.parametrize("prompt, prompts", [
    ("def ", ["def "]),
    (["a", "b"], ["a", "b"]),
    ([1, 2, 3], [[1, 2, 3]]),
    ([[1], [2, 3]], [[1], [2, 3]]),
])
def test_every_prompt_form(prompt, prompts):
    assert completion(prompt=prompt).prompts() == prompts


def test_sampling_params_from_a_full_request():
    r = completion(max_tokens=7, temperature=0.5, top_p=0.9, top_k=5, seed=3, stop=["\n", "##"], n=2,
                   presence_penalty=0.5, frequency_penalty=-1, stop_token_ids=[9], ignore_eos=True, user="me",
                   some_future_field={"x": 1})
    p = r.sampling_params(r.max_tokens, extra_stop=("##", "<|user|>"))
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed) == (7, 0.5, 0.9, 5, 3)
    assert p.stop == ("\n", "##", "<|user|>")  # the template's stop strings joined, without duplicates
    assert (p.stop_token_ids, p.ignore_eos, p.presence_penalty, p.frequency_penalty) == ((9,), True, 0.5, -1.0)
    assert r.choices_per_prompt == 2


def test_defaults_and_nulls():
    p = completion(temperature=None, top_p=None, n=None, seed=None, stop=None).sampling_params(16)
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.stop) == (16, 1.0, 1.0, 0, None, ())
    assert completion(top_k=-1).sampling_params(4).top_k == 0  # vLLM's "off"
    assert completion(stop="x").sampling_params(4).stop == ("x",)
    assert completion(echo=False, logprobs=None, suffix="", best_of=1).prompts() == ["hi"]
    r = completion(stream=True, stream_options={"include_usage": True})
    assert r.include_usage and not completion(stream=True).include_usage


def test_chat_max_tokens_names():
    assert chat(max_completion_tokens=5).max_tokens_asked() == 5
    assert chat(max_tokens=6).max_tokens_asked() == 6
    assert chat(max_tokens=6, max_completion_tokens=6).max_tokens_asked() == 6
    assert chat().max_tokens_asked() is None
    with pytest.raises(RequestError, match=r"max_completion_tokens: differs from max_tokens \(5 against 6\)"):
        chat(max_tokens=6, max_completion_tokens=5).max_tokens_asked()


COMPLETION_ERRORS = [
    ({"prompt": None}, "prompt", "must be a string, a list of strings", "None"),
    ({"prompt": []}, "prompt", "must not be an empty list", "[]"),
    ({"prompt": [[1], []]}, "prompt", "each list non-empty", "[[1], []]"),
    ({"prompt": [1, -2]}, "prompt", "integers >= 0", "[1, -2]"),
    ({"prompt": [1, "a"]}, "prompt", "a list of token ids", "[1, 'a']"),
    ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1", "0"),
    ({"max_tokens": "5"}, "max_tokens", "valid integer", "'5'"),
    ({"max_tokens": 2.5}, "max_tokens", "valid integer", "2.5"),
    ({"temperature": 2.5}, "temperature", "less than or equal to 2", "2.5"),
    ({"temperature": -0.1}, "temperature", "greater than or equal to 0", "-0.1"),
    ({"temperature": float("nan")}, "temperature", "finite number", "nan"),
    ({"temperature": "hot"}, "temperature", "valid number", "'hot'"),
    ({"top_p": 0}, "top_p", "greater than 0", "0"),
    ({"top_p": 1.5}, "top_p", "less than or equal to 1", "1.5"),
    ({"top_k": -2}, "top_k", "greater than or equal to -1", "-2"),
    ({"n": 0}, "n", "greater than or equal to 1", "0"),
    ({"n": 1000}, "n", "less than or equal to 128", "1000"),
    ({"stream": "yes"}, "stream", "valid boolean", "'yes'"),
    ({"stream": 1}, "stream", "valid boolean", "1"),
    ({"stream_options": {"include_usage": "no"}}, "stream_options.include_usage", "valid boolean", "'no'"),
    ({"stream_options": 3}, "stream_options", "valid dictionary", "3"),
    ({"stop": 5}, "stop", "a string or a list of strings", "5"),
    ({"stop": ["a", 1]}, "stop", "a string or a list of strings", "['a', 1]"),
    ({"stop": ["a", ""]}, "stop", "non-empty string", "['a', '']"),
    ({"seed": -1}, "seed", "greater than or equal to 0", "-1"),
    ({"seed": 2**64}, "seed", "less than", str(2**64)),
    ({"presence_penalty": 3}, "presence_penalty", "less than or equal to 2", "3"),
    ({"frequency_penalty": -2.5}, "frequency_penalty", "greater than or equal to -2", "-2.5"),
    ({"logprobs": 1}, "logprobs", "not supported", "1"),
    ({"logprobs": 0}, "logprobs", "not supported", "0"),
    ({"echo": True}, "echo", "not supported", "True"),
    ({"suffix": "end"}, "suffix", "not supported", "'end'"),
    ({"best_of": 3}, "best_of", "not supported", "3"),
    ({"logit_bias": {"5": 10}}, "logit_bias", "not supported", "{'5': 10}"),
    ({"stop_token_ids": [-1]}, "stop_token_ids[0]", "greater than or equal to 0", "-1"),
    ({"model": 7}, "model", "valid string", "7"),
]


@pytest.mark.parametrize("fields, param, what, value", COMPLETION_ERRORS,
                         ids=[f"{e[1]}={e[3]}" for e in COMPLETION_ERRORS])
def test_each_completion_error_names_field_and_value(fields, param, what, value):
    with pytest.raises(RequestError) as e:
        completion(**fields)
    assert e.value.status == 400 and e.value.param == param
    assert e.value.message.startswith(f"{param}: ") and what in e.value.message and value in e.value.message


CHAT_ERRORS = [
    ({"messages": "hi"}, "messages", "valid list", "'hi'"),
    ({"logprobs": True}, "logprobs", "not supported", "True"),
    ({"top_logprobs": 2}, "top_logprobs", "not supported", "2"),
    ({"tools": [{"type": "function"}]}, "tools", "not supported", "function"),
    ({"response_format": {"type": "json_object"}}, "response_format", "only {'type': 'text'}", "json_object"),
    ({"max_completion_tokens": 0}, "max_completion_tokens", "greater than or equal to 1", "0"),
]


@pytest.mark.parametrize("fields, param, what, value", CHAT_ERRORS, ids=[e[1] for e in CHAT_ERRORS])
def test_each_chat_error_names_field_and_value(fields, param, what, value):
    with pytest.raises(RequestError) as e:
        chat(**fields)
    assert e.value.param == param and e.value.message.startswith(f"{param}: ")
    assert what in e.value.message and value in e.value.message


def test_missing_fields_and_cross_field_errors():
    with pytest.raises(RequestError, match="^prompt: is required$"):
        parse_request(CompletionRequest, {"max_tokens": 3})
    with pytest.raises(RequestError, match="^messages: is required$"):
        parse_request(ChatCompletionRequest, {})
    with pytest.raises(RequestError, match="stream_options: only allowed when stream is true, got stream False"):
        completion(stream_options={"include_usage": True}).sampling_params(4)


def test_fastapi_errors_become_openai_400s():
    """FastAPI's RequestValidationError locations start with "body"; an undecodable body has no field."""
    e = request_error_of([{"type": "greater_than_equal", "loc": ("body", "n"), "msg": "Input should be >= 1",
                           "input": 0}])
    assert (e.status, e.param, e.message) == (400, "n", "n: input should be >= 1, got 0")
    e = request_error_of([{"type": "json_invalid", "loc": ("body", 3), "msg": "JSON decode error",
                           "ctx": {"error": "Expecting value"}}])
    assert e.param is None and "not valid JSON (Expecting value)" in e.message
    long = request_error_of([{"type": "string_type", "loc": ("body", "model"), "msg": "Input should be a string",
                              "input": ["x"] * 500}])
    assert len(long.message) < 200 and long.message.endswith("...")


def test_error_body_is_openai_shaped():
    assert error_body("n: bad", "n") == {"error": {"message": "n: bad", "type": "invalid_request_error", "param": "n",
                                                   "code": None}}
    e = RequestError("queue full", None, 429, "queue_full", "rate_limit_error")
    assert e.body()["error"] == {"message": "queue full", "type": "rate_limit_error", "param": None,
                                 "code": "queue_full"}
