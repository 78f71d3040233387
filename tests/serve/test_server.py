"""The OpenAI-compatible server, live: uvicorn on a free loopback port in a background thread over an engine with a
tiny model, driven through the official ``openai`` client and raw ``httpx``. Greedy answers are the tokens of
``sample_tokens(..., temperature=0)``; every error has its status and a message naming the field; a full queue is
a 429; a client that leaves mid-request frees its slot; an engine error fails only its own request; ``moekit serve``
drains in-flight work on SIGTERM."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

for _name in ("fastapi", "uvicorn", "openai", "httpx"):
    pytest.importorskip(_name, reason=f"the server tests need {_name} (pip install 'moekit[serve]' openai httpx)")

import httpx  # noqa: E402
import openai  # noqa: E402
from live_server import live_server  # noqa: E402

from moekit.formats.tokenizer import ByteTokenizer  # noqa: E402
from moekit.model.generate import sample_tokens  # noqa: E402
from moekit.model.presets import PRESETS  # noqa: E402
from moekit.model.transformer import Transformer  # noqa: E402
from moekit.serve.chat import ChatTemplate  # noqa: E402
from moekit.serve.engine import Engine, EngineConfig, EngineStopped, RequestOutput  # noqa: E402
from moekit.serve.server import create_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TOK = ByteTokenizer()


def tiny_model(max_seq_len: int = 128) -> Transformer:
    torch.manual_seed(0)
    return Transformer(dataclasses.replace(PRESETS["tiny"](), max_seq_len=max_seq_len)).eval()


def wait_until(cond, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def idle(engine) -> bool:
    s = engine.stats()
    return s["running"] == 0 and s["waiting"] == 0 and s["free_slots"] == s["slots"]


@pytest.fixture(scope="module")
def srv():
    model = tiny_model()
    engine = Engine(model, TOK, EngineConfig(max_batch=4))
    engine.start()
    with live_server(engine) as s:
        s.ref = copy.deepcopy(model)  # greedy references, apart from the engine thread's model
        s.client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        s.http = httpx.Client(base_url=s.url, timeout=60)
        yield s


def greedy(s, ids: list[int], n: int) -> list[int]:
    return list(sample_tokens(s.ref, ids, n, temperature=0))


def test_models(srv):
    models = srv.client.models.list()
    assert [m.id for m in models.data] == ["tiny"] and models.data[0].model_extra["max_model_len"] == 128
    assert srv.client.models.retrieve("tiny").owned_by == "moekit"
    with pytest.raises(openai.NotFoundError, match="the model 'gpt-4' does not exist"):
        srv.client.models.retrieve("gpt-4")


def test_greedy_completions_are_the_sequential_greedy_tokens(srv):
    r = srv.client.completions.create(model="tiny", prompt="def ", max_tokens=12, temperature=0,
                                      extra_body={"return_token_ids": True})
    want = greedy(srv, TOK.encode("def "), 12)
    c = r.choices[0]
    assert c.model_extra["token_ids"] == want and c.text == TOK.decode(want) and c.finish_reason == "length"
    assert c.model_extra["prompt_token_ids"] == TOK.encode("def ")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (4, 12, 16)
    assert r.object == "text_completion" and r.model == "tiny" and r.id.startswith("cmpl-")
    # several prompts in one request, as text and as token ids: one choice each, in order
    r = srv.client.completions.create(model="tiny", prompt=[[5, 6, 7], [40, 41]], max_tokens=6, temperature=0,
                                      extra_body={"return_token_ids": True})
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.model_extra["token_ids"] for c in r.choices] == [greedy(srv, [5, 6, 7], 6), greedy(srv, [40, 41], 6)]
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 12
    r = srv.client.completions.create(model="tiny", prompt=["ab", "cd"], max_tokens=3, temperature=0)
    assert [c.text for c in r.choices] == [TOK.decode(greedy(srv, TOK.encode(p), 3)) for p in ("ab", "cd")]


def test_chat_uses_the_template_and_greedy_tokens(srv):
    messages = [{"role": "system", "content": "terse"}, {"role": "user", "content": "hi"}]
    r = srv.client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=10, temperature=0,
                                           extra_body={"return_token_ids": True})
    ids = TOK.encode(ChatTemplate().render(messages))
    c = r.choices[0]
    assert c.model_extra["prompt_token_ids"] == ids
    assert c.model_extra["token_ids"] == greedy(srv, ids, 10) and c.message.role == "assistant"
    assert c.message.content == TOK.decode(greedy(srv, ids, 10)) and c.finish_reason == "length"
    assert r.object == "chat.completion" and r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 10


def test_streaming_through_the_client_equals_the_whole_answer(srv):
    whole = srv.client.completions.create(model="tiny", prompt="class ", max_tokens=16, temperature=0).choices[0]
    chunks = list(srv.client.completions.create(model="tiny", prompt="class ", max_tokens=16, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert all(c.usage is None for c in chunks[:-1])
    messages = [{"role": "user", "content": "hello"}]
    whole = srv.client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    chunks = list(srv.client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                                     stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].object == "chat.completion.chunk"


def test_sse_framing_raw(srv):
    body = {"prompt": "x", "max_tokens": 5, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    with srv.http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = raw.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 6
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]][-1] == "length"


def test_stream_interval_sends_several_tokens_per_chunk(srv):
    engine = Engine(tiny_model(), TOK, EngineConfig(max_batch=2))
    engine.start()
    body = {"prompt": "def ", "max_tokens": 11, "temperature": 0, "stream": True, "return_token_ids": True}
    with live_server(engine, stream_interval=4) as s, httpx.Client(base_url=s.url, timeout=60) as http:
        for n in (1, 2):  # one choice, and two interleaved
            with http.stream("POST", "/v1/completions", json={**body, "n": n}) as r:
                assert r.status_code == 200
                events = r.read().decode().split("\n\n")[:-1]
            assert events[-1] == "data: [DONE]"
            chunks = [json.loads(e[len("data: "):])["choices"][0] for e in events[:-1]]
            for i in range(n):
                mine = [c for c in chunks if c["index"] == i]
                sizes = [len(c["token_ids"]) for c in mine if c["finish_reason"] is None]
                # 11 tokens in chunks of at least 4 (the last, fewer); the whole text and tokens as unstreamed
                assert all(k >= 4 for k in sizes[:-1]) and sum(sizes) == 11 and len(sizes) <= 3, sizes
                assert [t for c in mine for t in c["token_ids"]] == greedy(srv, TOK.encode("def "), 11)
                assert "".join(c["text"] for c in mine) == TOK.decode(greedy(srv, TOK.encode("def "), 11))
                assert mine[-1]["finish_reason"] == "length"
    with pytest.raises(ValueError, match="stream_interval: must be an integer >= 1, got 0"):
        create_app(engine, "tiny", stream_interval=0)


def test_stop_strings_cut_the_text(srv):
    full = TOK.decode(greedy(srv, TOK.encode("def "), 24))
    # a character whose first occurrence is past the start: the text must end just before it
    i = next(i for i in range(3, len(full)) if full[i] != "\ufffd" and full[i] not in full[:i])
    for stream in (False, True):
        r = srv.client.completions.create(model="tiny", prompt="def ", max_tokens=24, temperature=0, stop=[full[i]],
                                          stream=stream)
        choices = [c.choices[0] for c in r] if stream else r.choices
        assert "".join(c.text for c in choices) == full[:i] and choices[-1].finish_reason == "stop"


def test_n_choices_seeded_and_interleaved(srv):
    kw = {"model": "tiny", "prompt": "ab", "max_tokens": 8, "temperature": 1.0, "seed": 7}
    r = srv.client.completions.create(n=3, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2] and r.usage.completion_tokens == 24
    # choice k is the request with seed + k
    alone = [srv.client.completions.create(**{**kw, "seed": 7 + k}).choices[0].text for k in range(3)]
    assert [c.text for c in r.choices] == alone
    chunks = list(srv.client.completions.create(n=2, stream=True, **kw))
    by_index = {0: "", 1: ""}
    for c in chunks:
        by_index[c.choices[0].index] += c.choices[0].text
    assert [by_index[0], by_index[1]] == alone[:2]
    chat = srv.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "q"}], n=2,
                                              max_tokens=4, temperature=0)
    assert [c.index for c in chat.choices] == [0, 1] and chat.choices[0].message == chat.choices[1].message


BAD = [  # (endpoint, body, status, param, words of the message)
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens", "max_tokens: input should be greater"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature", "got 'hot'"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n", "n: input should be greater than or equal to 1, got 0"),
    ("/v1/completions", {"prompt": "x", "top_p": 2}, 400, "top_p", "top_p: input should be less than or equal to 1"),
    ("/v1/completions", {"prompt": "x", "logprobs": 2}, 400, "logprobs", "not supported"),
    ("/v1/completions", {"prompt": "x", "echo": True}, 400, "echo", "echo: is not supported"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options",
     "only allowed when stream is true"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt", "prompt: is required"),
    ("/v1/completions", {"prompt": [1, 2, 999]}, 400, "prompt", "token ids must be integers in [0, 256), got 999"),
    ("/v1/completions", {"prompt": "x" * 120, "max_tokens": 20}, 400, "max_tokens",
     "the context is 128 tokens; the prompt has 120 and max_tokens asks for 20"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model", "the model 'gpt-4' does not exist"),
    ("/v1/completions", [1, 2], 400, None, "valid dictionary"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "non-empty list"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role",
     "got 'robot'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content[0]", "only {'type': 'text'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "y" * 200}]}, 400, "messages",
     "the context is 128"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
                              "max_completion_tokens": 4}, 400, "max_completion_tokens", "differs from max_tokens"),
]


@pytest.mark.parametrize("endpoint, body, status, param, words", BAD, ids=[f"{b[0][4:]}-{b[3]}-{i}"
                                                                         for i, b in enumerate(BAD)])
def test_each_bad_request_is_a_4xx_naming_the_problem(srv, endpoint, body, status, param, words):
    r = srv.http.post(endpoint, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and words in err["message"]


def test_errors_through_the_client_and_raw_bodies(srv):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        srv.client.completions.create(model="tiny", prompt="x", temperature=5)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        srv.client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    r = srv.http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = srv.http.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found" and "/v1/nothing-here" in r.text
    r = srv.http.get("/v1/completions")
    assert r.status_code == 405 and "GET /v1/completions" in r.json()["error"]["message"]


def test_health_and_metrics(srv):
    assert srv.http.get("/health").json()["status"] == "ok"
    srv.http.post("/v1/completions", json={"prompt": "m", "max_tokens": 2})
    srv.http.post("/v1/completions", json={"prompt": "m", "max_tokens": 0})
    r = srv.http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text
    assert 'moekit_http_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert 'moekit_http_requests_total{endpoint="/v1/completions",status="400"}' in text
    assert 'moekit_http_requests_total{endpoint="/health",status="200"}' in text
    assert "moekit_generation_tokens_total" in text and 'moekit_requests_finished_total{finish_reason="length"}' in text
    assert "moekit_http_requests_in_flight 1" in text  # (this scrape)


@pytest.fixture(scope="module")
def slow():
    """One KV slot, a queue of one, a long context: a 1,500-token request holds the slot for seconds."""
    engine = Engine(tiny_model(2048), TOK, EngineConfig(max_batch=1, max_queue=1))
    engine.start()
    with live_server(engine) as s:
        # warm-up: the decode kernels compile on the first tokens (seconds, with the event loop starved of the GIL)
        assert httpx.post(s.url + "/v1/completions", json={"prompt": "w", "max_tokens": 64}, timeout=120).is_success
        yield s


def test_queue_full_is_429_and_leaving_streams_free_the_slot(slow):
    long = {"prompt": "a", "max_tokens": 1500, "temperature": 0, "stream": True}
    cancelled = slow.engine.metrics.finished.get("cancelled", 0)
    with httpx.Client(base_url=slow.url, timeout=60) as a, httpx.Client(base_url=slow.url, timeout=60) as b:
        with a.stream("POST", "/v1/completions", json=long) as ra:
            assert ra.status_code == 200
            lines = ra.iter_lines()  # (kept: a dropped iterator closes the response)
            next(lines)  # the first token is out: it holds the slot
            with b.stream("POST", "/v1/completions", json=long) as rb:
                assert rb.status_code == 200
                assert slow.engine.stats()["waiting"] == 1
                r = httpx.post(slow.url + "/v1/completions", json={"prompt": "c", "max_tokens": 2}, timeout=60)
                assert r.status_code == 429 and "queue is full" in r.json()["error"]["message"]
                with pytest.raises(openai.RateLimitError):
                    openai.OpenAI(base_url=slow.url + "/v1", api_key="x", max_retries=0).completions.create(
                        model="tiny", prompt="c", max_tokens=2)
    wait_until(lambda: idle(slow.engine), timeout=10)
    assert slow.engine.metrics.finished.get("cancelled", 0) == cancelled + 2
    assert httpx.post(slow.url + "/v1/completions", json={"prompt": "c", "max_tokens": 2}).status_code == 200


def test_a_non_streaming_client_that_leaves_cancels_its_request(slow):
    cancelled = slow.engine.metrics.finished.get("cancelled", 0)
    body = json.dumps({"prompt": "a", "max_tokens": 1500, "temperature": 0}).encode()
    port = int(slow.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_until(lambda: slow.engine.stats()["running"] == 1)
    wait_until(lambda: idle(slow.engine), timeout=10)
    assert slow.engine.metrics.finished.get("cancelled", 0) == cancelled + 1


class FakeEngine:
    """The engine interface with scripted events: a prompt starting with "fail" ends in an engine error."""

    tokenizer, max_seq_len = TOK, 64

    def __init__(self):
        self.metrics = SimpleNamespace(prometheus=lambda: "")
        self.stopped = False

    def submit(self, ids, params, sink=None, request_id=None):
        if self.stopped:
            raise EngineStopped("the engine is shutting down and takes no new request")
        fail = TOK.decode(ids).startswith("fail")

        def run():
            sink(RequestOutput(request_id, [65], "A", False, None, None, len(ids), 1))
            sink(RequestOutput(request_id, [], "", True, "error" if fail else "length",
                               "RuntimeError: boom" if fail else None, len(ids), 1))
        threading.Thread(target=run).start()

    def cancel(self, request_id):
        pass

    def stats(self):
        return {"slots": 1, "running": 0, "waiting": 0, "free_slots": 1, "accepting": not self.stopped}


def test_an_engine_error_fails_only_its_request_and_shutdown_is_503():
    with live_server(FakeEngine()) as s, httpx.Client(base_url=s.url) as http:
        r = http.post("/v1/completions", json={"prompt": "fail me", "max_tokens": 2})
        assert r.status_code == 500 and "the engine failed on this request: RuntimeError: boom" in r.text
        assert r.json()["error"]["type"] == "server_error"
        assert http.post("/v1/completions", json={"prompt": "ok", "max_tokens": 2}).json()["choices"][0]["text"] == "A"
        raw = http.post("/v1/completions", json={"prompt": "fail", "max_tokens": 2, "stream": True}).text
        events = [e[len("data: "):] for e in raw.split("\n\n") if e]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["message"].endswith("boom")
        s.engine.stopped = True
        r = http.post("/v1/completions", json={"prompt": "ok", "max_tokens": 2})
        assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
        assert http.get("/health").status_code == 503
        s.engine.stopped, s.app.state.draining = False, True
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 503 and http.get("/health").json()["status"] == "draining"


def test_moekit_serve_drains_on_sigterm(tmp_path):
    model = tiny_model()
    model.tokenizer = TOK
    model.save_pretrained(tmp_path / "ckpt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "moekit", "serve", str(tmp_path / "ckpt"), "--port", str(port),
                             "--max-batch", "2", "--model-name", "t"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def up():
            assert proc.poll() is None, proc.stdout.read()
            with contextlib.suppress(httpx.TransportError):
                return httpx.get(url + "/health").status_code == 200
        wait_until(up, timeout=120)
        body = {"model": "t", "prompt": "def ", "max_tokens": 100, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line)
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert first.startswith("data: {") and rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][len("data: "):])["choices"][0]["finish_reason"] == "length"  # drained, not cut
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
