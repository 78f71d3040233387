"""Expert parallelism on CPU: MoE layer step time and all-to-all traffic against the ep degree.

The same global work at every degree: ``--tokens`` tokens through one MoE layer, forward + backward.
ep=1 is the single-process layer in one process using all ``--cores``; ep=R runs R processes (gloo,
127.0.0.1) with cores/R torch threads each, every rank holding E/R experts and T/R tokens.

Per degree and mode (dropless, capacity) it reports the step time (median over steps of the slowest
rank), the time inside the dispatcher's collectives (all-to-all, count/capacity exchange, the
balance-loss all-reduce; host clock, which on CPU includes waiting for the slower peer), its share of
the step, the all-to-all bytes per step (forward + backward, summed over ranks, the local chunk not
counted) and the tokens each rank's experts processed.

    python benchmarks/expert_parallel.py                      # ep 1, 2 and 4; ~1-2 min on 2 cores
    python benchmarks/expert_parallel.py --ep 1 2 --steps 20  # the acceptance comparison, more samples

Prints a table and writes benchmarks/results/expert_parallel.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from moekit.config import MoEConfig  # noqa: E402
from moekit.layer.moe import MoE  # noqa: E402
from moekit.parallel import launch, setup_parallel, shard_model  # noqa: E402


def bench_worker(ep: int, args: dict) -> dict:
    ctx = setup_parallel(ep=ep)
    torch.manual_seed(0)
    cfg = MoEConfig(n_experts=args["experts"], top_k=args["top_k"], expert_ffn_dim=args["ffn"],
                    capacity_factor=args["capacity_factor"], backend=args["backend"])
    layer = shard_model(MoE(args["dim"], cfg), ctx)
    g = torch.Generator().manual_seed(1)
    x = ctx.local_batch(torch.randn(args["tokens"], args["dim"], generator=g)).requires_grad_()
    steps, comm, cpu = [], [], []
    for i in range(args["warmup"] + args["steps"]):
        if ctx.world_size > 1:
            dist.barrier(group=ctx.world_group)  # start together: the step is the slowest rank's
        meter = layer.dispatcher.meter if layer.dispatcher is not None else None
        s0 = meter.seconds if meter else 0.0
        t0, c0 = time.perf_counter(), time.process_time()
        res = layer(x)
        (res.out.square().mean() + res.aux_loss).backward()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        c = meter.seconds - s0 if meter else 0.0
        if ctx.world_size > 1:
            t = torch.tensor([dt, c, dc], dtype=torch.float64)
            dist.all_reduce(t[:1], op=dist.ReduceOp.MAX, group=ctx.world_group)
            dist.all_reduce(t[1:], group=ctx.world_group)
            dt, c, dc = float(t[0]), float(t[1]) / ctx.world_size, float(t[2])
        if i >= args["warmup"]:
            steps.append(dt)
            comm.append(c)
            cpu.append(dc)
        layer.zero_grad(set_to_none=True)
        x.grad = None
    metrics = ctx.comm_metrics(layer, steps=args["warmup"] + args["steps"])  # counts cover every step
    return {"step_s": steps, "comm_s": comm, "cpu_s": cpu, "metrics": metrics}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ep", type=int, nargs="+", default=[1, 2, 4], help="expert-parallel degrees (default 1 2 4)")
    p.add_argument("--modes", nargs="+", default=["dropless", "capacity"], choices=["dropless", "capacity"])
    p.add_argument("--capacity-factor", type=float, default=1.25, help="for the capacity mode (default 1.25)")
    p.add_argument("--tokens", type=int, default=4096, help="global tokens per step (default 4096)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512, help="expert ffn width (default 512)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--backend", default="auto", help="experts backend (default auto)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="cores shared by all processes")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "expert_parallel.json"))
    args = p.parse_args()

    rows = []
    for mode in args.modes:
        base = None
        # ep=1 with all cores and with one thread: on a loaded machine more threads can be slower;
        # ep > 1 is compared with the FASTER single-process run
        runs = [(ep, max(1, args.cores // ep)) for ep in sorted(set(args.ep))]
        if runs[0][0] == 1 and args.cores > 1:
            runs.insert(1, (1, 1))
        for ep, threads in runs:
            wargs = {**vars(args), "capacity_factor": args.capacity_factor if mode == "capacity" else None}
            res = launch(bench_worker, ep, (ep, wargs), threads=threads, timeout=1800)[0]
            step = statistics.median(res["step_s"])
            comm = statistics.median(res["comm_s"])
            if ep == 1:
                base = min(base or step, step)
            m = res["metrics"]
            rows.append({"mode": mode, "ep": ep, "processes": ep, "threads_per_process": threads,
                         "step_ms": 1e3 * step, "comm_ms": 1e3 * comm, "comm_share": comm / step,
                         "cpu_ms": 1e3 * statistics.median(res["cpu_s"]),
                         "vs_ep1": step / base if base and ep > 1 else None,
                         "a2a_bytes_per_step": m.get("ep/a2a_bytes", 0.0),
                         "tokens_recv_per_rank": m.get("ep/tokens_recv", [args.tokens * args.top_k]),
                         "recv_imbalance": m.get("ep/recv_imbalance", 1.0),
                         "step_ms_all": [1e3 * s for s in res["step_s"]]})
            r = rows[-1]
            print(f"{mode:9s} ep={ep} ({threads} thr)  step {r['step_ms']:8.1f} ms  comm {r['comm_ms']:7.1f} ms "
                  f"({100 * r['comm_share']:4.1f}%)  cpu {r['cpu_ms']:8.1f} ms  a2a "
                  f"{r['a2a_bytes_per_step'] / 2**20:6.2f} MiB/step", flush=True)

    print()
    print(f"MoE layer fwd+bwd, {args.tokens} tokens, D={args.dim}, F={args.ffn}, E={args.experts}, k={args.top_k}, "
          f"{args.cores} cores in total")
    print("step: median over steps of the slowest rank; comm: time in the dispatcher's collectives (mean over ranks);")
    print("cpu: process CPU time summed over ranks; vs ep1: step time / the faster single-process run")
    print(f"{'mode':9s} {'ep':>3s} {'thr':>4s} {'step ms':>9s} {'comm ms':>8s} {'comm %':>7s} {'cpu ms':>8s} "
          f"{'vs ep1':>7s} {'a2a MiB/step':>13s} {'recv imbal':>10s}")
    for r in rows:
        vs = f"{r['vs_ep1']:7.2f}" if r["vs_ep1"] else f"{'-':>7s}"
        print(f"{r['mode']:9s} {r['ep']:3d} {r['threads_per_process']:4d} {r['step_ms']:9.1f} {r['comm_ms']:8.1f} "
              f"{100 * r['comm_share']:6.1f}% {r['cpu_ms']:8.1f} {vs} "
              f"{r['a2a_bytes_per_step'] / 2**20:13.2f} {r['recv_imbalance']:10.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(args), "torch": torch.__version__, "results": rows}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
