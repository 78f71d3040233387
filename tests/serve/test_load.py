"""A bounded loopback load test: 100 requests at concurrency 16 against a live server over a tiny model, a share of
them malformed, oversized or cancelled mid-stream. Every valid greedy request gets exactly the sequential greedy
tokens, every bad one a 4xx naming its problem, no request a 5xx; afterwards /health is ok, the engine is idle (every
slot free, nothing queued) and the process's resident memory grew by less than a generous bound."""

from __future__ import annotations

import copy
import gc
import json
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

for _name in ("fastapi", "uvicorn", "httpx"):
    pytest.importorskip(_name, reason=f"the load test needs {_name} (pip install 'moekit[serve]' httpx)")

import httpx  # noqa: E402
from live_server import live_server  # noqa: E402

from moekit.formats.tokenizer import ByteTokenizer  # noqa: E402
from moekit.model.generate import sample_tokens  # noqa: E402
from moekit.model.presets import PRESETS  # noqa: E402
from moekit.model.transformer import Transformer  # noqa: E402
from moekit.serve.chat import DEFAULT_STOP, ChatTemplate  # noqa: E402
from moekit.serve.engine import Engine, EngineConfig  # noqa: E402

TOK = ByteTokenizer()
PROMPTS = ["def ", "class A:", "import os\n", "for i in", "x = [", "# a comment", "while True:", "return "]
MAX_TOKENS = 24  # the longest greedy answer asked for
RSS_GROWTH_BOUND = 256 * 2**20  # bytes: a leak of per-request state over 100 requests would pass it


def rss_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def cut_at_markers(text: str) -> tuple[str, str]:
    """A chat answer under the default template: the text up to the first role marker, and its finish reason."""
    hits = [i for m in DEFAULT_STOP if (i := text.find(m)) >= 0]
    return (text[:min(hits)], "stop") if hits else (text, "length")


def plan(rng: random.Random, n: int = 100) -> list[dict]:
    """The requests: ~60% valid greedy (completions and chat, streaming or not), the rest malformed, oversized or
    left mid-stream."""
    bad = [({"prompt": "x", "max_tokens": 0}, "max_tokens"), ({"prompt": "x", "temperature": 9}, "temperature"),
           ({"prompt": [1, 2, 300]}, "prompt"), ({"prompt": "x", "echo": True}, "echo"),
           ({"prompt": "x", "model": "other"}, "model"), ({"messages": [{"role": "bot", "content": "x"}]}, "role"),
           ({"prompt": "x", "stop": [""]}, "stop"), ({"max_tokens": 3}, "prompt")]
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.6:
            kind = "chat" if rng.random() < 0.3 else "completion"
            out.append({"kind": kind, "prompt": rng.choice(PROMPTS), "max_tokens": rng.randint(1, MAX_TOKENS),
                        "stream": rng.random() < 0.5})
        elif r < 0.75:
            body, param = rng.choice(bad)
            out.append({"kind": "bad", "body": body, "param": param})
        elif r < 0.85:
            out.append({"kind": "oversized", "body": {"prompt": "y" * 120, "max_tokens": 20}})
        else:
            out.append({"kind": "leave", "body": {"prompt": rng.choice(PROMPTS), "max_tokens": 100, "stream": True}})
    return out


def run_one(http: httpx.Client, req: dict, ref) -> dict:
    """Send one planned request; returns its status and what to check."""
    kind = req["kind"]
    if kind in ("bad", "oversized"):
        url = "/v1/chat/completions" if "messages" in req["body"] else "/v1/completions"
        r = http.post(url, json=req["body"])
        return {"status": r.status_code, "error": r.json().get("error", {})}
    if kind == "leave":
        with http.stream("POST", "/v1/completions", json=req["body"]) as r:
            lines = r.iter_lines()
            got = [line for line, _ in zip(lines, range(3))]  # two events and the blank line between: then leave
        return {"status": r.status_code, "left": len(got) == 3}
    chat = kind == "chat"
    body = {"temperature": 0, "max_tokens": req["max_tokens"], "stream": req["stream"], "return_token_ids": True}
    if chat:
        body["messages"] = [{"role": "user", "content": req["prompt"]}]
        ids = TOK.encode(ChatTemplate().render(body["messages"]))
    else:
        body["prompt"] = req["prompt"]
        ids = TOK.encode(req["prompt"])
    want_ids = ref(tuple(ids))[:req["max_tokens"]]
    want_text, want_reason = TOK.decode(want_ids), "length"
    if chat:
        want_text, want_reason = cut_at_markers(want_text)
    url = "/v1/chat/completions" if chat else "/v1/completions"
    if req["stream"]:
        with http.stream("POST", url, json=body) as r:
            raw = r.read().decode()
        events = [e[len("data: "):] for e in raw.split("\n\n") if e]
        assert events[-1] == "[DONE]", raw[-300:]
        choices = [json.loads(e)["choices"][0] for e in events[:-1]]
        text = "".join((c["delta"].get("content") or "") if chat else c["text"] for c in choices)
        got_ids = [t for c in choices for t in c.get("token_ids", [])]
        reason = choices[-1]["finish_reason"]
    else:
        r = http.post(url, json=body)
        if r.status_code != 200:
            return {"status": r.status_code, "error": r.json().get("error", {})}
        c = r.json()["choices"][0]
        text, got_ids, reason = (c["message"]["content"] if chat else c["text"]), c["token_ids"], c["finish_reason"]
    ok = (text, reason) == (want_text, want_reason) and (chat and reason == "stop" or got_ids == want_ids)
    return {"status": r.status_code, "ok": ok, "got": (text, reason, got_ids), "want": (want_text, want_reason,
                                                                                         want_ids)}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the resident memory from /proc/self/status")
def test_loopback_load_every_answer_exact_no_5xx_engine_idle_memory_bounded():
    torch.manual_seed(0)
    model = Transformer(PRESETS["tiny"]()).eval()
    reference = copy.deepcopy(model)
    cache: dict[tuple[int, ...], list[int]] = {}
    lock = threading.Lock()

    def ref(ids: tuple[int, ...]) -> list[int]:
        with lock:  # (one reference model, shared by the client threads)
            if ids not in cache:
                cache[ids] = list(sample_tokens(reference, list(ids), MAX_TOKENS, temperature=0))
            return cache[ids]

    engine = Engine(model, TOK, EngineConfig(max_batch=8, max_queue=128))
    engine.start()
    local = threading.local()

    def client() -> httpx.Client:
        if not hasattr(local, "http"):
            local.http = httpx.Client(base_url=url, timeout=120)
        return local.http

    with live_server(engine) as live:
        url = live.url
        rng = random.Random(0)
        warm = [{"kind": "completion", "prompt": p, "max_tokens": MAX_TOKENS, "stream": False} for p in PROMPTS] * 2
        with ThreadPoolExecutor(16) as pool:  # warm-up: the kernels of every batch size compile here
            assert all(r["ok"] for r in pool.map(lambda q: run_one(client(), q, ref), warm))
        gc.collect()
        rss_before = rss_bytes()
        cancelled_before = engine.metrics.finished.get("cancelled", 0)
        requests = plan(rng)
        t0 = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda q: run_one(client(), q, ref), requests))
        seconds = time.monotonic() - t0
        gc.collect()
        growth = rss_bytes() - rss_before

        statuses = [r["status"] for r in results]
        assert not [s for s in statuses if s >= 500], statuses
        for q, r in zip(requests, results):
            if q["kind"] in ("completion", "chat"):
                assert r["status"] == 200 and r.get("ok"), (q, r)
            elif q["kind"] == "bad":
                assert 400 <= r["status"] < 500 and q["param"] in r["error"]["message"], (q, r)
            elif q["kind"] == "oversized":
                assert r["status"] == 400 and "the context is 128 tokens" in r["error"]["message"], r
            else:
                assert r["status"] == 200 and r["left"], r
        kinds = [q["kind"] for q in requests]
        assert kinds.count("completion") + kinds.count("chat") >= 50 and min(map(kinds.count, ("bad", "leave"))) >= 5

        deadline = time.monotonic() + 20
        while engine.stats()["running"] or engine.stats()["waiting"]:
            assert time.monotonic() < deadline, engine.stats()
            time.sleep(0.05)
        stats = engine.stats()
        assert stats["free_slots"] == stats["slots"] == 8 and stats["waiting"] == 0
        assert engine.metrics.finished.get("cancelled", 0) - cancelled_before == kinds.count("leave")
        health = httpx.get(url + "/health").json()
        assert health["status"] == "ok" and health["running"] == 0
        assert growth < RSS_GROWTH_BOUND, f"resident memory grew by {growth / 2**20:.0f} MiB over the load"
        print(f"\n{len(requests)} requests at concurrency 16 in {seconds:.1f}s; RSS {growth / 2**20:+.1f} MiB")
