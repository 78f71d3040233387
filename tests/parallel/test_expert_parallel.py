"""Expert parallelism (``moekit.parallel``) against the single-process layer and model, on CPU with gloo.

Legend: R expert-parallel ranks, E experts, L = E / R experts per rank, T tokens of a rank.

Every distributed case runs in processes started by ``moekit.parallel.launch`` (127.0.0.1, a free port,
one torch thread each) with a 60 s process-group timeout and an outer deadline that kills them, so
nothing here can hang. Process start-up dominates on a small machine, so one launch of 2 processes and
one of 4 each run a list of jobs (module fixtures); the tests compare those results with single-process
references computed here, in float32 with tight tolerances.
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch
from safetensors.torch import load_file

from moekit.config import ModelConfig, MoEConfig
from moekit.layer.losses import switch_aux_loss
from moekit.layer.moe import MoE
from moekit.model.transformer import Transformer
from moekit.parallel import (
    ParallelContext,
    full_optimizer_state,
    full_state_dict,
    launch,
    load_model,
    save_model,
    setup_parallel,
    shard_model,
    shard_optimizer_state,
)
from moekit.train.state import read_model

PG_TIMEOUT = timedelta(seconds=60)
DEADLINE = 300  # seconds for a whole launch; far above its normal run time, far below a CI timeout
DIM, N_EXPERTS, STEPS = 16, 8, 20
ATOL = 1e-5


# ---------------------------------------------------------------------------------------------- jobs
LAYER_CASES = {
    "dropless": {},
    "capacity": {"capacity_factor": 1.0},
    "zero-recv-dropless": {"expert_bias": True},  # the last rank's experts never chosen: it receives nothing
    "zero-recv-capacity": {"expert_bias": True, "capacity_factor": 1.0},
    # the other experts backends on received rows ("auto" is grouped_mm where it runs)
    "dropless-loop": {"backend": "loop"},
    "capacity-padded": {"capacity_factor": 1.0, "backend": "padded"},
}


def _layer(case: str, R: int) -> MoE:
    torch.manual_seed(0)
    cfg = MoEConfig(n_experts=N_EXPERTS, top_k=2, expert_ffn_dim=8, aux_loss_coef=0.1, **LAYER_CASES[case])
    layer = MoE(DIM, cfg)
    if cfg.expert_bias:  # selection-only bias: also gives experts that get no token in the step
        layer.router.expert_bias[-N_EXPERTS // R:] = -1e3
    return layer


def _layer_inputs(R: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Unequal local batch sizes T_r = 5 + 3r, and a random cotangent for each rank's output."""
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(5 + 3 * r, DIM, generator=g) for r in range(R)]
    return xs, [torch.randn(x.shape, generator=g) for x in xs]


def job_layer(case: str, R: int) -> dict:
    ctx = setup_parallel(ep=R, timeout=PG_TIMEOUT)
    layer = shard_model(_layer(case, R), ctx)
    xs, gs = _layer_inputs(R)
    x = xs[ctx.rank].requires_grad_()
    res = layer(x)
    # the aux loss of each rank is its share of the global one: their mean is the single-process value
    ((res.out * gs[ctx.rank]).sum() + res.aux_loss / ctx.world_size).backward()
    ctx.reduce_grads(layer)  # mean over ranks; experts that saw no token count as zero gradient
    stats = ctx.reduce_stats([res.stats])[0]
    return {"out": res.out.detach(), "x_grad": x.grad, "stats": stats, "metrics": ctx.comm_metrics(layer),
            "grads": {n: p.grad for n, p in layer.named_parameters()}}


def job_capacity_without_host_sync() -> bool:
    """Capacity mode: forward and backward through both exchanges read no tensor value on the host.

    On CPU every tensor is on the host, so the markers of a device->host sync (``tolist``, ``item``,
    truth tests, ``float``) are made to raise. ``int()`` stays allowed: the capacities of the ranks are
    host integers exchanged over the CPU group, not device values.
    """
    ctx = setup_parallel(ep=2, timeout=PG_TIMEOUT)
    torch.manual_seed(0)
    cfg = MoEConfig(n_experts=N_EXPERTS, top_k=2, expert_ffn_dim=8, capacity_factor=1.0, backend="grouped")
    layer = shard_model(MoE(DIM, cfg), ctx)
    x = _layer_inputs(2)[0][ctx.rank].requires_grad_()
    layer(x)  # warm-up: the one-time grouped_mm capability check may sync

    def boom(*args, **kwargs):
        raise AssertionError("host sync in the capacity-mode expert-parallel path")

    names = ("item", "tolist", "__bool__", "__float__")
    saved = {name: getattr(torch.Tensor, name) for name in names}
    try:
        for name in names:
            setattr(torch.Tensor, name, boom)
        res = layer(x)
        (res.out.square().mean() + res.aux_loss + res.z_loss).backward()
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
    return x.grad is not None and layer.experts.w_in.grad is not None


def _model_config() -> ModelConfig:
    moe = MoEConfig(n_experts=4, top_k=2, expert_ffn_dim=8, aux_loss_coef=0.01, seq_aux_loss_coef=1e-3,
                    z_loss_coef=1e-3, expert_bias=True, bias_update_rate=1e-3)
    return ModelConfig(vocab_size=32, dim=DIM, n_layers=2, n_heads=2, ffn_dim=16, max_seq_len=16, moe=moe)


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.randint(0, 32, (4, 9), generator=g) for _ in range(STEPS)]  # global batch: 4 sequences


EVAL_IDS = torch.arange(16).view(2, 8) % 32


def train_steps(ctx: ParallelContext, ddp: bool = False):
    """A minimal AdamW loop using the hooks a trainer needs; identical code for 1 and W processes."""
    torch.manual_seed(0)
    model = shard_model(Transformer(_model_config()), ctx)
    net = ctx.wrap_ddp(model) if ddp else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses, first_stats = [], None
    for batch in _batches():
        b = ctx.local_batch(batch)
        out = net(b[:, :-1], b[:, 1:])
        out.loss.backward()
        ctx.reduce_grads(net)
        ctx.clip_grad_norm_(net, 0.5)  # small enough to clip: every replica must clip alike
        opt.step()
        opt.zero_grad(set_to_none=True)
        stats = ctx.reduce_stats(out.stats)
        model.update_router_biases([s.routed_per_expert for s in stats if s is not None])
        losses.append(float(ctx.all_reduce_mean(out.loss)))
        first_stats = first_stats or stats
    return model, opt, losses, first_stats


def _eval_logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(EVAL_IDS).logits


def job_train(ep: int, dp: int, ddp: bool, ckpt: str | None) -> dict:
    ctx = setup_parallel(ep=ep, dp=dp, timeout=PG_TIMEOUT)
    model, opt, losses, stats = train_steps(ctx, ddp)
    result = {"losses": losses, "stats": stats, "state": full_state_dict(model, ctx),
              "optim": full_optimizer_state(model, opt, ctx)}
    # gathering copies: the model and its optimizer keep their shards
    assert all(opt.state[p]["exp_avg"].shape == p.shape for p in model.parameters())
    if ckpt is not None:
        save_model(model, ckpt, ctx)
        if ctx.is_main:
            torch.save(result["optim"], f"{ckpt}/optim.pt")
    result["logits"] = _eval_logits(model)
    return result


def job_load(ckpt: str, ep: int, resave: str) -> dict:
    ctx = setup_parallel(ep=ep, timeout=PG_TIMEOUT)
    model = load_model(ckpt, ctx)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    shard_optimizer_state(model, opt, torch.load(f"{ckpt}/optim.pt", weights_only=True), ctx)
    result = {"optim": full_optimizer_state(model, opt, ctx), "logits": _eval_logits(model),
              "n_local_experts": model.moe_layers[0].experts.w_in.shape[0]}
    save_model(model, resave, ctx)
    return result


JOBS = {"layer": job_layer, "train": job_train, "load": job_load, "nosync": job_capacity_without_host_sync}


def run_jobs(jobs: list[tuple]) -> dict:
    return {job: JOBS[job[0]](*job[1:]) for job in jobs}


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tmp_path_factory.mktemp("ep-ckpt")


@pytest.fixture(scope="module")
def run2(ckpt):
    jobs = [("layer", case, 2) for case in LAYER_CASES] + [("train", 2, 1, False, str(ckpt / "ep2")), ("nosync",)]
    return launch(run_jobs, 2, (jobs,), timeout=DEADLINE, threads=1)


@pytest.fixture(scope="module")
def run4(run2, ckpt):  # loads the checkpoint run2 wrote
    jobs = [("layer", case, 4) for case in LAYER_CASES] + [("train", 2, 2, True, None),
                                                           ("load", str(ckpt / "ep2"), 4, str(ckpt / "ep4"))]
    return launch(run_jobs, 4, (jobs,), timeout=DEADLINE, threads=1)


@pytest.fixture(scope="module")
def reference_training():
    return train_steps(ParallelContext())


# ---------------------------------------------------------------------------------------------- layer
def _reference_layer(case: str, R: int) -> dict:
    """The unsharded layer on each rank's tokens (capacity is per rank), the aux loss on all tokens."""
    layer = _layer(case, R)
    xs, gs = _layer_inputs(R)
    xs = [x.requires_grad_() for x in xs]
    results = [layer(x) for x in xs]
    routing = layer.router(torch.cat(xs))
    lb = switch_aux_loss(routing.probs_TE, routing.topk_idx_TK)
    loss = sum((r.out * g).sum() for r, g in zip(results, gs)) + layer.config.aux_loss_coef * lb
    loss.backward()
    return {"outs": [r.out.detach() for r in results], "x_grads": [x.grad for x in xs], "lb": lb.detach(),
            "grads": {n: p.grad for n, p in layer.named_parameters()}, "config": layer.config,
            "kept": [r.stats.tokens_per_expert for r in results],
            "routed": sum(r.stats.routed_per_expert for r in results), "sizes": [x.shape[0] for x in xs]}


@pytest.mark.parametrize("R", [2, 4])
@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_layer_forward_backward_match_single_process(request, R, case):
    ranks = request.getfixturevalue(f"run{R}")
    got = [r[("layer", case, R)] for r in ranks]
    ref = _reference_layer(case, R)
    L = N_EXPERTS // R
    for r in range(R):
        torch.testing.assert_close(got[r]["out"], ref["outs"][r], rtol=0, atol=ATOL)
        torch.testing.assert_close(got[r]["x_grad"], ref["x_grads"][r], rtol=0, atol=ATOL)
    # reduce_grads averages over the R ranks (each rank's loss is one term of the reference's sum)
    for name, g in ref["grads"].items():
        if name.startswith("experts."):  # each rank holds experts [r L, (r+1) L)
            shards = [got[r]["grads"][name] for r in range(R)]
            assert all(s.shape[0] == L for s in shards)
            torch.testing.assert_close(torch.cat(shards) * R, g, rtol=0, atol=ATOL)
        else:  # replicated: the same on every rank
            for r in range(R):
                torch.testing.assert_close(got[r]["grads"][name] * R, g, rtol=0, atol=ATOL)

    # statistics of the global batch, identical on every rank
    kept = sum(ref["kept"])
    for r in range(R):
        stats = got[r]["stats"]
        torch.testing.assert_close(stats.lb_loss, ref["lb"], rtol=0, atol=ATOL)
        torch.testing.assert_close(stats.routed_per_expert, ref["routed"])
        torch.testing.assert_close(stats.tokens_per_expert, kept)
        assert int(stats.dead_experts) == int((ref["routed"] == 0).sum())

    # observability: tokens each rank's experts processed, the all-to-all volume
    metrics = got[0]["metrics"]
    for r in range(1, R):  # every rank reports the same (the host clock aside)
        assert got[r]["metrics"] | {"ep/a2a_seconds": 0} == metrics | {"ep/a2a_seconds": 0}
    recv = kept.view(R, L).sum(1)
    assert metrics["ep/tokens_recv"] == recv.tolist()
    assert metrics["ep/recv_imbalance"] == pytest.approx(float(recv.max() / recv.mean()))
    if case.startswith("zero-recv"):
        assert metrics["ep/tokens_recv"][-1] == 0
    cfg = ref["config"]
    if cfg.capacity_factor is None:  # rows each rank sends to the others
        rows = sum(int(k.view(R, L).sum(1).sum() - k.view(R, L).sum(1)[r]) for r, k in enumerate(ref["kept"]))
    else:  # L*C slots to each other rank, C from the sender's own batch size
        rows = sum((R - 1) * L * cfg.capacity(T) for T in ref["sizes"])
    assert metrics["ep/a2a_bytes"] == 4 * rows * DIM * 4  # dispatch + combine, forward + backward, fp32


def test_capacity_mode_exchanges_without_host_sync(run2):
    assert all(r[("nosync",)] for r in run2)


# ---------------------------------------------------------------------------------------------- model
@pytest.mark.parametrize("layout", ["ep2xdp1", "ep2xdp2-ddp"])
def test_20_training_steps_match_one_process(request, layout, reference_training):
    ranks = request.getfixturevalue("run2" if layout == "ep2xdp1" else "run4")
    key = next(k for k in ranks[0] if k[0] == "train")
    model, opt, losses, stats = reference_training
    assert len({tuple(r[key]["losses"]) for r in ranks}) == 1  # every rank logs the same global loss
    for r in ranks:
        got = r[key]
        # float32 sums in another order move the loss by ~5e-7; a per-rank clipping norm moves it by ~6e-6
        assert got["losses"] == pytest.approx(losses, rel=0, abs=2e-6)
        ref_state = model.state_dict()
        assert got["state"].keys() == ref_state.keys()
        for name, v in ref_state.items():
            torch.testing.assert_close(got["state"][name], v, rtol=0, atol=2e-6, msg=name)
            assert torch.equal(got["state"][name], ranks[0][key]["state"][name]), f"replicas differ: {name}"
        ref_optim = opt.state_dict()["state"]
        for idx, st in ref_optim.items():
            for k, v in st.items():
                torch.testing.assert_close(got["optim"]["state"][idx][k].float(), v.float(), rtol=1e-3, atol=1e-6)
        # aux losses and load statistics of the first step, reduced over all ranks = one process
        for s, ref_s in zip(got["stats"], stats):
            for field in ("tokens_per_expert", "routed_per_expert", "load_imbalance", "dropped_frac",
                          "router_entropy", "dead_experts", "lb_loss"):
                torch.testing.assert_close(getattr(s, field), getattr(ref_s, field), rtol=1e-6, atol=1e-6,
                                           msg=field)


def test_checkpoints_reshard_across_1_2_and_4_ranks(run2, run4, ckpt, reference_training):
    """Saved at ep=2 (the trained model), loaded at ep=1 and ep=4: same logits; the file is the
    single-process format (read_model checks every name and shape), and re-saving at ep=4 gives it back."""
    logits_ep2 = run2[0][("train", 2, 1, False, str(ckpt / "ep2"))]["logits"]
    single = read_model(ckpt / "ep2")
    torch.testing.assert_close(_eval_logits(single), logits_ep2, rtol=0, atol=ATOL)
    torch.testing.assert_close(_eval_logits(reference_training[0]), logits_ep2, rtol=0, atol=1e-4)
    loaded = [r[("load", str(ckpt / "ep2"), 4, str(ckpt / "ep4"))] for r in run4]
    for r in loaded:
        assert r["n_local_experts"] == 1
        torch.testing.assert_close(r["logits"], logits_ep2, rtol=0, atol=ATOL)
    a, b = load_file(ckpt / "ep2" / "model.safetensors"), load_file(ckpt / "ep4" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # optimizer moments: gathered at ep=2, sliced at ep=4, gathered again: unchanged
    saved = torch.load(ckpt / "ep2" / "optim.pt", weights_only=True)
    for idx, st in saved["state"].items():
        for k, v in st.items():
            assert torch.equal(loaded[0]["optim"]["state"][idx][k], v), (idx, k)


# ---------------------------------------------------------------------------------------------- edges
def test_experts_not_divisible_by_ep_is_a_clear_error():
    layer = MoE(DIM, MoEConfig(n_experts=6, top_k=2, expert_ffn_dim=8))
    with pytest.raises(ValueError, match=r"n_experts=6 is not divisible by ep=4"):
        shard_model(layer, ParallelContext(ep=4))  # raised before any collective, on every rank alike
    assert layer.dispatcher is None and layer.experts.w_in.shape[0] == 6


def test_single_process_context_changes_nothing():
    ctx = setup_parallel(ep=1)
    assert ctx.world_size == 1 and ctx.mesh is None
    layer = _layer("dropless", 2)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    assert shard_model(layer, ctx) is layer and layer.dispatcher is None
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())


def job_stuck_peer() -> None:
    ctx = setup_parallel(ep=2, timeout=timedelta(seconds=3))
    layer = shard_model(_layer("dropless", 2), ctx)
    if ctx.rank == 1:
        time.sleep(120)  # never joins the all-to-all
    layer(torch.randn(4, DIM))


def test_a_stuck_rank_fails_fast_instead_of_hanging():
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 0 of 2 failed"):
        launch(job_stuck_peer, 2, timeout=DEADLINE, threads=1)
    assert time.monotonic() - t0 < 60  # the 3 s process-group timeout fired; the sleeper was killed


def job_sleep() -> None:
    time.sleep(120)


def test_launch_deadline_kills_the_processes():
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish within"):
        launch(job_sleep, 1, timeout=3, threads=1)
    assert time.monotonic() - t0 < 30
