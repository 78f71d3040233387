#!/usr/bin/env python3
"""Serving throughput against concurrency: the MoE model and its dense twins, through the engine and over HTTP.

The claim measured: at batch 1 an MoE model decodes like a dense model of its active size, and under many
concurrent requests each expert's weights serve many tokens at once. Where does the MoE model's output tokens/s
overtake, or fall behind, the dense model's as the batch grows?

For each model (MoE, its dense twin with the same active parameters, and with ``--dense-total`` the twin with the
same total parameters) and each concurrency c in ``--concurrency``: c clients, each sending ``--requests-per-client``
requests one after the other (a closed loop: c requests are in flight at any time), greedy, ``--prompt-tokens``
random prompt tokens and ``--max-tokens`` new tokens each (end-of-text ignored, so every request has the same
length). Path ``engine``: the clients submit to a running ``moekit.serve.Engine`` (its own thread) in this process.
Path ``http``: the same engine behind ``moekit serve``'s app (uvicorn on 127.0.0.1, in this process, as ``moekit
serve`` runs it), clients streaming ``/v1/completions`` over httpx from a separate process (as vLLM's
``benchmark_serving`` does: clients that shared the server's interpreter would take its GIL for their parsing, a
cost no real deployment pays). Reported: output tokens/s (all completion tokens over the wall time),
mean time to first token (client side), and the ratios c / c=1 and http / engine; each the median of
``--repeats`` runs, the paths alternating (the host's speed drifts by tens of percent over a minute).

    python3 benchmarks/serve_throughput.py                          # preset small, random weights
    python3 benchmarks/serve_throughput.py --checkpoint runs/small/moe --dense-total

Prints a table, writes ``benchmarks/results/serve_throughput.json`` and, with matplotlib, a plot next to it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from moekit.formats.tokenizer import ByteTokenizer
from moekit.host import probe_host
from moekit.model.costs import dense_twin
from moekit.model.presets import PRESETS
from moekit.model.transformer import Transformer
from moekit.serve.engine import Engine, EngineConfig
from moekit.serve.sampling import SamplingParams

OUT = Path(__file__).resolve().parent / "results" / "serve_throughput.json"


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(n)]


def run_engine(engine: Engine, prompts: list[list[int]], c: int, max_tokens: int) -> dict:
    """c client threads, each submitting its share of the prompts one after another."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    shares = [prompts[i::c] for i in range(c)]
    ttft: list[float] = []
    tokens = [0]
    lock = threading.Lock()

    def client(share: list[list[int]]) -> None:
        for p in share:
            t0 = time.perf_counter()
            first = None
            n = 0
            for out in engine.submit(p, params).outputs():
                if out.token_ids and first is None:
                    first = time.perf_counter() - t0
                n += len(out.token_ids)
            with lock:
                ttft.append(first)
                tokens[0] += n

    t, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(c) as pool:
        list(pool.map(client, shares))
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    return {"tokens": tokens[0], "seconds": wall, "tokens_per_s": tokens[0] / wall, "ttft_s": statistics.mean(ttft),
            "server_cpu_s": cpu}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """``moekit serve``'s app on a uvicorn server in a background thread."""

    def __init__(self, engine: Engine, stream_interval: int = 1):
        import uvicorn

        from moekit.serve.server import create_app

        self.port = _free_port()
        app = create_app(engine, "bench", stream_interval=stream_interval)
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def run_http(port: int, prompts: list[list[int]], c: int, max_tokens: int, client: str = "raw") -> dict:
    """The clients (:func:`raw_clients` or :func:`http_clients`) in a fresh process (spawned: it shares nothing
    with the server's)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        cpu = time.process_time()
        r = pool.apply(raw_clients if client == "raw" else http_clients, (port, prompts, c, max_tokens))
        r["server_cpu_s"] = time.process_time() - cpu
    if r["tokens"] != len(prompts) * max_tokens:  # (every request runs to max_tokens: end-of-text is ignored)
        raise RuntimeError(f"the {client} clients counted {r['tokens']} tokens, not {len(prompts) * max_tokens}")
    return r


def raw_clients(port: int, prompts: list[list[int]], c: int, max_tokens: int) -> dict:
    """c asyncio clients on bare sockets: each request a ``Connection: close`` HTTP/1.1 POST, its streamed reply read
    to the end as bytes; the first token is the first read holding a chunk, the token count the usage chunk's.

    Why not httpx: this host has 2 cores and the engine's kernels use both, so every cycle a client spends is taken
    from the engine (a process burning 16% of one core cuts the engine's tokens/s by about 20% here). httpx decoding
    every chunk's JSON costs about that much at c=16; these clients cost a fraction, as a load generator should
    (``--client httpx`` measures with httpx all the same)."""
    import re

    usage_re = re.compile(rb'"completion_tokens":\s*(\d+)')

    async def main() -> dict:
        ttft: list[float] = []
        tokens = [0]

        async def one(share: list[list[int]]) -> None:
            for p in share:
                body = json.dumps({"model": "bench", "prompt": p, "max_tokens": max_tokens, "temperature": 0,
                                   "stream": True, "ignore_eos": True,
                                   "stream_options": {"include_usage": True}}).encode()
                t0 = time.perf_counter()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                             b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                first, parts = None, []
                while data := await reader.read(1 << 16):
                    if first is None and b'"choices":[{' in data.replace(b" ", b""):
                        first = time.perf_counter() - t0
                    parts.append(data)
                writer.close()
                reply = b"".join(parts)
                if not reply.startswith(b"HTTP/1.1 200") or b"data: [DONE]" not in reply:
                    raise RuntimeError(f"bad reply: {reply[:300]!r}")
                tokens[0] += int(usage_re.findall(reply)[-1])
                ttft.append(first)

        return await _closed_loop(one, prompts, c, ttft, tokens)

    return asyncio.run(main())


async def _closed_loop(one, prompts: list[list[int]], c: int, ttft: list[float], tokens: list[int]) -> dict:
    """c clients ``one(share)`` at once, each with its share of the prompts; their figures, timed."""
    t, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one(prompts[i::c]) for i in range(c)))
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    return {"tokens": tokens[0], "seconds": wall, "tokens_per_s": tokens[0] / wall, "ttft_s": statistics.mean(ttft),
            "client_cpu_s": cpu}


def http_clients(port: int, prompts: list[list[int]], c: int, max_tokens: int) -> dict:
    """c asyncio clients streaming /v1/completions (token-id prompts), one request after another each."""
    import httpx

    url = f"http://127.0.0.1:{port}/v1/completions"
    body = {"model": "bench", "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}

    async def main() -> dict:
        ttft: list[float] = []
        tokens = [0]
        async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=c + 4)) as client:
            async def one(share: list[list[int]]) -> None:
                for p in share:
                    t0 = time.perf_counter()
                    first = None
                    async with client.stream("POST", url, json={**body, "prompt": p}) as r:
                        if r.status_code != 200:
                            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
                        async for line in r.aiter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            chunk = json.loads(line[6:])
                            if chunk.get("choices") and first is None:
                                first = time.perf_counter() - t0
                            if chunk.get("usage"):
                                tokens[0] += chunk["usage"]["completion_tokens"]
                    ttft.append(first)

            return await _closed_loop(one, prompts, c, ttft, tokens)

    return asyncio.run(main())


def _models(args) -> dict[str, Transformer]:
    if args.checkpoint:
        from moekit.train.evaluation import load_for_inference

        moe, _, _ = load_for_inference(args.checkpoint)
        cfg = moe.config
    else:
        cfg = PRESETS[args.preset]()
        torch.manual_seed(0)
        moe = Transformer(cfg)
    models = {"moe": moe}
    twins = ["active", "total"] if args.dense_total else ["active"]
    for match in twins:
        torch.manual_seed(0)
        models[f"dense_{match}"] = Transformer(dense_twin(cfg, match)).to(next(moe.parameters()).dtype)
    return {k: m.eval() for k, m in models.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--checkpoint", default=None, help="a trained MoE checkpoint (its dense twins: random weights)")
    p.add_argument("--dense-total", action="store_true", help="also the dense twin with the same total parameters")
    p.add_argument("--concurrency", default="1,2,4,8,16,32")
    p.add_argument("--paths", default="engine,http,http:4",
                   help="engine; http (a chunk per token); http:N (moekit serve --stream-interval N)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--client", choices=["raw", "httpx"], default="raw",
                   help="the HTTP clients: bare sockets (light, the default) or httpx (decodes every chunk)")
    p.add_argument("--repeats", type=int, default=3, help="runs per (model, path, concurrency): the median is kept")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    paths = args.paths.split(",")
    models = _models(args)
    host = probe_host()
    rows = []
    for name, model in models.items():
        engine = Engine(model, ByteTokenizer() if model.config.vocab_size == 256 else None,
                        EngineConfig(max_batch=max(levels), max_queue=4 * max(levels)))
        engine.start()
        servers = {path: _Server(engine, int(path.partition(":")[2] or 1)) for path in paths if path != "engine"}
        try:
            warm = _prompts(max(levels), args.prompt_tokens, model.config.vocab_size, 99)
            run_engine(engine, warm, max(levels), 8)  # compile the decode kernels at every batch size seen
            for c in levels:
                run_engine(engine, warm[:c], c, 4)
                prompts = _prompts(c * args.requests_per_client, args.prompt_tokens, model.config.vocab_size, c)
                runs: dict[str, list[dict]] = {path: [] for path in paths}
                for _ in range(args.repeats):  # the paths alternate, so a slow spell of the host hits both
                    for path in paths:
                        r = (run_engine(engine, prompts, c, args.max_tokens) if path == "engine"
                             else run_http(servers[path].port, prompts, c, args.max_tokens, args.client))
                        runs[path].append(r)
                        print(f"{name:13} {path:6} c={c:3}  {r['tokens_per_s']:8.1f} tok/s  "
                              f"ttft {r['ttft_s'] * 1e3:7.1f} ms  cpu s: server {r['server_cpu_s']:.2f} "
                              f"clients {r.get('client_cpu_s', 0.0):.2f} wall {r['seconds']:.2f}", flush=True)
                for path, rs in runs.items():
                    mid = sorted(rs, key=lambda r: r["tokens_per_s"])[len(rs) // 2]  # the median run
                    rows.append({"model": name, "path": path, "concurrency": c, **mid,
                                 "tokens_per_s_runs": [r["tokens_per_s"] for r in rs]})
        finally:
            for server in servers.values():
                server.close()
            engine.shutdown(drain=False)
    base = {(r["model"], r["path"]): r["tokens_per_s"] for r in rows if r["concurrency"] == levels[0]}
    eng = {(r["model"], r["concurrency"]): r["tokens_per_s"] for r in rows if r["path"] == "engine"}
    for r in rows:
        r["vs_c1"] = r["tokens_per_s"] / base[(r["model"], r["path"])]
        if r["path"] != "engine" and (r["model"], r["concurrency"]) in eng:
            r["http_vs_engine"] = r["tokens_per_s"] / eng[(r["model"], r["concurrency"])]
    moe_eng = {r["concurrency"]: r["tokens_per_s"] for r in rows if r["model"] == "moe" and r["path"] == "engine"}
    for r in rows:
        if r["path"] == "engine" and r["concurrency"] in moe_eng:
            r["moe_vs_this"] = moe_eng[r["concurrency"]] / r["tokens_per_s"]
    print(f"\n{host.cpu_model} ({host.kind}), {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{args.prompt_tokens} prompt + {args.max_tokens} new tokens per request, greedy")
    print(f"{'model':13} {'path':6} {'conc':>4} {'tok/s':>9} {'x c=1':>7} {'http/eng':>8} {'moe/this':>8} "
          f"{'TTFT ms':>8}")
    for r in rows:
        print(f"{r['model']:13} {r['path']:6} {r['concurrency']:4d} {r['tokens_per_s']:9.1f} {r['vs_c1']:7.2f} "
              f"{r.get('http_vs_engine', float('nan')):8.2f} {r.get('moe_vs_this', float('nan')):8.2f} "
              f"{r['ttft_s'] * 1e3:8.1f}")
    result = {"host": host.to_dict(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "threads": torch.get_num_threads(), "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    if not args.no_plot:
        _plot(rows, args.out.with_suffix(".png"))


def _plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: no plot (pip install 'moekit[plot]')")
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    styles = ["-o", "--o", ":o", "-s", "--s", ":s", "-^", "--^", ":^"]
    for (model, path_), style in zip(sorted({(r["model"], r["path"]) for r in rows}), styles):
        rs = [r for r in rows if r["model"] == model and r["path"] == path_]
        a.plot([r["concurrency"] for r in rs], [r["tokens_per_s"] for r in rs], style, label=f"{model} ({path_})")
        b.plot([r["concurrency"] for r in rs], [r["ttft_s"] * 1e3 for r in rs], style, label=f"{model} ({path_})")
    for ax, label in ((a, "output tokens/s"), (b, "time to first token (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    a.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
