"""Expert offloading: the offloaded model computes what the resident model computes, at every budget down to one
slot per layer, prefill and decode, float64 and bf16; the pool evicts the least recently used expert; a budget
below one expert per layer, and a missing or truncated expert file, are clear errors naming the budget or tensor."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from moekit.formats.checkpoint import CheckpointError
from moekit.formats.load import from_pretrained
from moekit.layer.moe import MoE
from moekit.model.generate import sample_tokens
from moekit.model.presets import PRESETS
from moekit.model.transformer import Transformer
from moekit.offload import ExpertPool, ExpertStore, OffloadedExperts, load_offloaded, offload_stats
from moekit.offload.load import GIB, expert_bytes
from moekit.offload.prefetch import PrefetchJob
from moekit.offload.store import read_header


def tiny(dtype: torch.dtype, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = dataclasses.replace(PRESETS["tiny"](), max_seq_len=64)
    return Transformer(cfg).to(dtype).eval()


def budget_for(model: Transformer, slots: int, dtype: torch.dtype) -> float:
    """The GiB that give ``slots`` slots per MoE layer."""
    return slots * len(model.moe_layers) * expert_bytes(model.moe_layers[0].experts, dtype) / GIB


def offloaded_one_slot(tmp_path):
    """A tiny fp32 model saved to ``tmp_path`` and loaded with one slot per layer: (model, file, its bytes,
    the offloaded model)."""
    model = tiny(torch.float32)
    model.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    return model, f, f.read_bytes(), load_offloaded(tmp_path, budget_for(model, 1, torch.float32), tokenizer=False)


def pool_of(path, resident, layer: int, slots: int, dtype: torch.dtype, keep: bool = True):
    """An ExpertPool of ``slots`` slots on layer ``layer``'s experts of the checkpoint at ``path``: (pool, its
    slot stacks, the resident layer's experts)."""
    prefix = f"layers.{layer}.ffn.experts"
    store = ExpertStore(path, [f"{prefix}.w_in", f"{prefix}.w_out"])
    ex = resident.layers[layer].ffn.experts
    stacks = {"w_in": torch.zeros(slots, *ex.w_in.shape[1:], dtype=dtype),
              "w_out": torch.zeros(slots, *ex.w_out.shape[1:], dtype=dtype)}
    return ExpertPool(store, prefix, ex.n_experts, slots, stacks, keep), stacks, ex


@pytest.fixture(scope="module", params=[torch.float64, torch.bfloat16], ids=["f64", "bf16"])
def saved(request, tmp_path_factory):
    dtype = request.param
    model = tiny(dtype)
    path = tmp_path_factory.mktemp(f"ckpt-{str(dtype)[6:]}")
    model.save_pretrained(path)
    resident = from_pretrained(path, dtype="stored", tokenizer=False).eval()
    for layer in resident.moe_layers:  # the reference runs the router, then the experts (as the offloaded layer)
        layer.experts.routed_decode = False
    return path, resident, dtype


def test_offloaded_forward_equals_resident(saved):
    path, resident, dtype = saved
    E = resident.config.moe.n_experts
    ids = torch.randint(0, resident.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = resident(ids).logits
        for slots in (E, E - 1, 2, 1):
            model = load_offloaded(path, budget_for(resident, slots, dtype), dtype="stored", tokenizer=False)
            assert {m.n_slots for m in model.modules() if isinstance(m, OffloadedExperts)} == {slots}
            got = model(ids).logits
            assert got.dtype == want.dtype
            # (prefill: each expert's GEMMs on the same rows as the resident layer's loop kernel: the same bits)
            assert torch.equal(got, want), (slots, (got - want).abs().max())
            stats = offload_stats(model)
            assert stats["misses"] + stats["prefetched"] >= E * len(resident.moe_layers) and stats["bytes_read"] > 0


@pytest.mark.parametrize("slots_per_k", [4, 1, 0.5])
def test_offloaded_decode_equals_resident(saved, slots_per_k):
    path, resident, dtype = saved
    K = resident.config.moe.top_k
    slots = max(1, int(slots_per_k * K))
    model = load_offloaded(path, budget_for(resident, slots, dtype), dtype="stored", tokenizer=False)
    prompt = [3, 14, 15, 92, 65, 35]
    want = list(sample_tokens(resident, prompt, 12, temperature=0))
    got = list(sample_tokens(model, prompt, 12, temperature=0))
    if slots >= K or dtype == torch.float64:  # (bf16 in waves: the rounding may flip a near tie)
        assert got == want
    # a decode call whose experts fit the pool runs the resident kernel on the same values: the same bits; one that
    # runs in waves sums their parts in another order: equal up to rounding
    g = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        for T in (1, 3, 1, 3):
            x_TD = torch.randn(T, resident.config.dim, generator=g).to(dtype)
            for layer_r, layer_o in zip(resident.moe_layers, model.moe_layers):
                want_TD, got_TD = layer_r(x_TD, aux=False).out, layer_o(x_TD, aux=False).out
                needed = layer_r.router(x_TD).topk_idx_TK.unique().numel()
                if needed <= slots:
                    assert torch.equal(got_TD, want_TD), (T, slots, needed)
                else:
                    tol = 1e-12 if dtype == torch.float64 else 3e-2
                    torch.testing.assert_close(got_TD, want_TD, rtol=tol, atol=tol)
    stats = offload_stats(model)
    assert 0 < stats["hit_rate"] < 1


def test_decode_step_in_waves_matches_up_to_rounding(saved):
    """One slot per layer and top-2: every decode step loads its experts in two waves."""
    path, resident, dtype = saved
    model = load_offloaded(path, budget_for(resident, 1, dtype), dtype="stored", tokenizer=False)
    x = torch.randn(3, resident.config.dim, generator=torch.Generator().manual_seed(2)).to(dtype)
    layer_r, layer_o = resident.moe_layers[0], model.moe_layers[0]
    with torch.inference_mode():
        want = layer_r(x, aux=False).out
        got = layer_o(x, aux=False).out
    tol = 1e-12 if dtype == torch.float64 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_pool_evicts_least_recently_used(saved):
    path, resident, dtype = saved
    pool, stacks, ex = pool_of(path, resident, 1, 2, dtype)
    assert pool.fetch([0]) == [0] and pool.fetch([1]) == [1]
    pool.fetch([0])                      # 0 used last: 1 is the least recently used
    assert pool.fetch([2]) == [1] and pool.evicted == [1]
    assert torch.equal(stacks["w_in"][1], ex.w_in[2].detach()) and torch.equal(stacks["w_out"][0], ex.w_out[0])
    assert pool.fetch([0, 3]) == [0, 1] and pool.evicted == [1, 2]   # 2 was older than 0
    assert (pool.hits, pool.misses) == (2, 4)
    with pytest.raises(ValueError, match="3 experts at once, the pool has 2 slots"):
        pool.fetch([4, 5, 6])


def test_budget_below_one_expert_per_layer_is_an_error(saved):
    path, resident, dtype = saved
    one = budget_for(resident, 1, dtype)
    with pytest.raises(ValueError, match=r"expert_memory: .* GiB holds less than one expert per MoE layer: 2 layers"):
        load_offloaded(path, one * 0.9, dtype="stored")
    with pytest.raises(ValueError, match="expert_memory: must be > 0 GiB, got 0"):
        load_offloaded(path, 0, dtype="stored")


def test_truncated_or_missing_expert_file_names_the_tensor(tmp_path):
    model = tiny(torch.float32)
    model.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    header, start = read_header(f)
    begin, end = header["layers.1.ffn.experts.w_out"]["data_offsets"]
    f.write_bytes(data[: start + (begin + end) // 2])  # cut in the middle of one expert tensor
    with pytest.raises(CheckpointError, match=r"truncated: tensor layers\.1\.ffn\.experts\.w_out ends at byte"):
        load_offloaded(tmp_path, 1.0, tokenizer=False)
    f.write_bytes(data)
    off = load_offloaded(tmp_path, budget_for(model, 1, torch.float32), tokenizer=False)
    f.write_bytes(data[: len(data) // 2])  # the file shrinks under a loaded model: the next load fails, named
    with pytest.raises(CheckpointError, match=r"truncated: tensor layers\.\d\.ffn\.experts\.w_\w+ expert \d+"):
        with torch.inference_mode():
            off(torch.randint(0, 256, (1, 32)))
    os.remove(f)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_offloaded(tmp_path, 1.0, tokenizer=False)


def test_offloaded_model_is_used_by_the_layer_paths(saved):
    path, resident, dtype = saved
    model = load_offloaded(path, budget_for(resident, 2, dtype), dtype="stored", tokenizer=False)
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    assert layers and all(isinstance(m.experts, OffloadedExperts) for m in layers)
    resident_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    full = sum(p.numel() * p.element_size() for p in resident.parameters())
    pool = sum(b.numel() * b.element_size() for m in layers for b in m.experts.buffers())
    assert resident_bytes + pool < full  # the routed experts are not in RAM beyond the pool


def test_engine_fails_only_the_request_whose_expert_cannot_be_read(tmp_path):
    from moekit.formats.tokenizer import ByteTokenizer
    from moekit.serve.engine import Engine, EngineConfig
    from moekit.serve.sampling import SamplingParams

    model, f, data, off = offloaded_one_slot(tmp_path)
    engine = Engine(off, ByteTokenizer(), EngineConfig(max_batch=2))
    engine.start()
    try:
        params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        header, start = read_header(f)
        begin, _ = header["layers.0.ffn.experts.w_in"]["data_offsets"]
        with open(f, "r+b") as fh:  # in place (the store's open file sees it): the experts' bytes are gone
            fh.truncate(start + begin)
        outs = list(engine.submit([5, 6, 7], params).outputs())
        assert outs[-1].finish_reason == "error" and "layers.0.ffn.experts.w_in" in outs[-1].error
        with open(f, "r+b") as fh:  # the file is back: the engine went on, the next request is answered
            fh.write(data)
        outs = list(engine.submit([5, 6, 7], params).outputs())
        assert outs[-1].finish_reason == "length", outs[-1].error
        assert [t for o in outs for t in o.token_ids] == list(sample_tokens(model.eval(), [5, 6, 7], 6, temperature=0))
    finally:
        engine.shutdown(drain=False)


def test_cli_generate_with_expert_memory(tmp_path):
    import subprocess
    import sys

    model = tiny(torch.float32)
    model.save_pretrained(tmp_path)
    gb = budget_for(model, 1, torch.float32) * 1.01
    r = subprocess.run([sys.executable, "-m", "moekit", "generate", str(tmp_path), "--benchmark", "--prompt-tokens",
                        "8", "--max-new-tokens", "4", "--rounds", "1", "--expert-memory", repr(gb)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "offloaded experts    1 slots per layer: hit rate" in r.stdout
    r = subprocess.run([sys.executable, "-m", "moekit", "generate", str(tmp_path), "--benchmark",
                        "--expert-memory", repr(gb / 2)], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "holds less than one expert per MoE layer" in r.stderr


def test_a_failed_load_frees_its_slot(tmp_path):
    model, f, data, off = offloaded_one_slot(tmp_path)
    pool = off.moe_layers[0].experts.pool
    with open(f, "r+b") as fh:
        fh.truncate(len(data) // 3)
    with pytest.raises(CheckpointError):
        pool.fetch([1])
    assert pool.free == [0] and not pool.lru
    with open(f, "r+b") as fh:
        fh.write(data)
    assert pool.fetch([1]) == [0]
    assert torch.equal(off.moe_layers[0].experts.w_in[0], model.moe_layers[0].experts.w_in[1].detach())


@pytest.mark.parametrize("slots", [8, 2, 1])
def test_prefetch_never_changes_results(saved, slots):
    """With and without the prefetch thread, and naive loading: the same logits and greedy tokens as resident."""
    path, resident, dtype = saved
    ids = torch.randint(0, resident.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(4))
    prompt = [7, 1, 8, 2, 8, 1, 8]
    want_tokens = list(sample_tokens(resident, prompt, 10, temperature=0))
    runs = {}
    for prefetch, cache in ((True, "lru"), (False, "lru"), (False, "none")):
        model = load_offloaded(path, budget_for(resident, slots, dtype), dtype="stored", tokenizer=False,
                               prefetch=prefetch, cache=cache)
        with torch.inference_mode():
            logits = model(ids).logits
        runs[prefetch, cache] = (logits, list(sample_tokens(model, prompt, 10, temperature=0)), offload_stats(model))
    base_logits, base_tokens, _ = runs[False, "lru"]
    for key, (logits, tokens, _) in runs.items():
        assert torch.equal(logits, base_logits), key
        assert tokens == base_tokens, key
    if slots >= resident.config.moe.top_k or dtype == torch.float64:
        assert base_tokens == want_tokens
    with_prefetch, naive = runs[True, "lru"][2], runs[False, "none"][2]
    assert with_prefetch["prefetched"] > 0 and runs[False, "lru"][2]["prefetched"] == 0
    assert with_prefetch["guess_per_layer"][0] is None  # (the first MoE layer has no layer before it to guess)
    assert all(0 <= g["recall"] <= 1 and g["needed"] > 0 for g in with_prefetch["guess_per_layer"][1:])
    assert naive["hits"] == 0 and naive["misses"] > runs[False, "lru"][2]["misses"]


def test_prefetch_reads_the_next_layers_guess(saved):
    """Layer 0 on x guesses layer 1's experts with layer 1's router on x: the same x at layer 1 hits them all."""
    path, resident, dtype = saved
    model = load_offloaded(path, budget_for(resident, 4, dtype), dtype="stored", tokenizer=False)
    first, second = model.moe_layers
    x_TD = torch.randn(1, resident.config.dim, generator=torch.Generator().manual_seed(5)).to(dtype)
    with torch.inference_mode():
        first(x_TD, aux=False)
        guess = sorted(second.router(x_TD).topk_idx_TK.reshape(-1).tolist())
        second.experts.pending[1].result()  # (the read, done on the prefetch thread)
        pool = second.experts.pool
        assert sorted(pool.lru) == guess and pool.prefetched == len(guess) and pool.misses == 0
        got, want = second(x_TD, aux=False).out, resident.moe_layers[1](x_TD, aux=False).out
    assert (pool.hits, pool.prefetch_hits, pool.misses) == (len(guess), len(guess), 0)
    assert second.experts.score.recall == 1.0 and second.experts.score.precision == 1.0
    assert torch.equal(got, want)


def test_pool_prefetch_evicts_least_recently_used_and_counts_first_use(saved):
    path, resident, dtype = saved
    pool, stacks, ex = pool_of(path, resident, 0, 2, dtype)
    pool.fetch([0]), pool.fetch([1]), pool.fetch([0])
    pool.prefetch(PrefetchJob([2, 3, 1]))  # at most S guesses; 1 is the least recently used, 0 the latest call's
    assert pool.evicted == [1] and sorted(pool.lru) == [0, 2] and pool.prefetched == 1
    assert torch.equal(stacks["w_in"][pool.slot_of(2)], ex.w_in[2].detach())
    pool.fetch([2]), pool.fetch([2])     # the first use of a prefetched expert, then reuse
    assert (pool.hits, pool.prefetch_hits, pool.misses) == (3, 1, 2)
    pool.prefetch(PrefetchJob([3, 1]))   # the latest call's 2 stays: 0 makes room for 3, then no room is left
    assert sorted(pool.lru) == [2, 3] and pool.evicted == [1, 0] and pool.prefetched == 2
    pool.prefetch(PrefetchJob([1, 0], cancelled=True))  # (the layer arrived first: nothing is read)
    assert sorted(pool.lru) == [2, 3] and pool.prefetched == 2
    pool.prefetch(PrefetchJob([1, 0], keep_last=False))  # a guess that measured better may evict the last call's
    assert sorted(pool.lru) == [0, 1] and pool.prefetched == 4
    # reuse: fetches [0], [1], [0], [2], [2]: of 5 needed experts, 1 had been needed by the call before
    assert (pool.reuse_right, pool.reuse_total) == (1, 5) and pool.reuse_rate == 0.2
    naive = pool_of(path, resident, 0, 2, dtype, keep=False)[0]
    naive.fetch([0]), naive.fetch([0])
    assert (naive.hits, naive.misses) == (0, 2)


def test_bad_cache_policy_is_an_error(saved):
    path, resident, dtype = saved
    with pytest.raises(ValueError, match="cache: 'fifo' is not one of lru, none"):
        load_offloaded(path, 1.0, dtype="stored", cache="fifo")


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "buffered"])
def test_store_reads_every_expert_exactly_direct_or_buffered(tmp_path, direct):
    """Past the page cache (O_DIRECT through an aligned bounce buffer, where the file system has it) or through
    it: the same bytes as the checkpoint's tensors, into fp32 or a converting dtype; a cut file names the expert."""
    model = tiny(torch.float32)
    model.save_pretrained(tmp_path)
    names = [f"layers.{i}.ffn.experts.{p}" for i in range(2) for p in ("w_in", "w_out")]
    store = ExpertStore(tmp_path, names, direct=direct)
    state = model.state_dict()
    for name in names:
        for e in range(model.config.moe.n_experts):
            out = torch.empty(store.tensors[name].expert_shape)
            store.read(name, e, out)
            assert torch.equal(out, state[name][e]), (name, e)
            out64 = torch.empty(store.tensors[name].expert_shape, dtype=torch.float64)
            store.read(name, e, out64)
            assert torch.equal(out64, state[name][e].double())
    assert store.reads == 2 * len(names) * model.config.moe.n_experts
    f = tmp_path / "model.safetensors"
    header, start = read_header(f)
    begin, end = header[names[-1]]["data_offsets"]
    with open(f, "r+b") as fh:
        fh.truncate(start + end - 10)  # the last expert of the last tensor loses its last bytes
    last = model.config.moe.n_experts - 1
    with pytest.raises(CheckpointError, match=rf"truncated: tensor {names[-1]} expert {last} needs bytes"):
        store.read(names[-1], last, torch.empty(store.tensors[names[-1]].expert_shape))
    store.read(names[-1], 0, torch.empty(store.tensors[names[-1]].expert_shape))  # (the others still read)


def test_a_batched_decode_step_loads_its_union_of_experts_once(saved):
    """The engine's decode step sends all its rows through a layer at once: each expert they share is read once."""
    path, resident, dtype = saved
    model = load_offloaded(path, budget_for(resident, 4, dtype), dtype="stored", tokenizer=False, prefetch=False)
    layer = model.moe_layers[0]
    x_TD = torch.randn(6, resident.config.dim, generator=torch.Generator().manual_seed(6)).to(dtype)
    with torch.inference_mode():
        union = layer.router(x_TD).topk_idx_TK.unique().numel()
        layer(x_TD, aux=False)
    pool = layer.experts.pool
    assert union < 6 * resident.config.moe.top_k and (pool.misses, pool.hits) == (union, 0)
    assert layer.experts.pool.store.reads == union * 2  # (w_in and w_out of each)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_the_prefetch_guess_is_the_routers_selection(score_func):
    """Without group limits the four-op guess picks what the router picks (with the balancing bias), most chosen
    first, at most n."""
    from moekit.config import MoEConfig
    from moekit.layer.router import Router
    from moekit.offload.prefetch import guessed_experts

    for seed in range(3):
        torch.manual_seed(seed)
        router = Router(32, MoEConfig(n_experts=8, top_k=2, expert_ffn_dim=16, score_func=score_func,
                                      expert_bias=True)).double()
        router.weight.data.normal_()
        router.expert_bias.copy_(torch.randn(8) * 0.1)
        x_TD = torch.randn(5, 32, dtype=torch.float64)
        with torch.inference_mode():
            chosen_TK = router(x_TD).topk_idx_TK
            one = guessed_experts(router, x_TD[:1], 8)
            many = guessed_experts(router, x_TD, 3)
        assert sorted(one) == sorted(chosen_TK[0].tolist())
        counts = torch.bincount(chosen_TK.reshape(-1), minlength=8)
        assert len(many) == 3 and all(counts[e] > 0 for e in many)
        assert sorted(counts[many].tolist(), reverse=True) == counts.sort(descending=True).values[:3].tolist()
