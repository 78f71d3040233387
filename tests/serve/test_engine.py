"""The engine: continuous batching gives every request the tokens it gets alone; slots, queue, cancel, errors.

The reference for greedy requests is ``moekit.model.generate.sample_tokens(temperature=0)``, the single-sequence
path ``moekit generate`` runs."""

from __future__ import annotations

import threading

import pytest
import torch

from moekit.formats.tokenizer import ByteTokenizer
from moekit.model.generate import sample_tokens
from moekit.model.presets import PRESETS
from moekit.model.transformer import Transformer
from moekit.serve.engine import Engine, EngineConfig, EngineStopped, PromptTooLong, QueueFull
from moekit.serve.sampling import SamplingParams
from moekit.serve.slots import slot_bytes

TOK = ByteTokenizer()
TEXTS = ["hello world", "a", "the quick brown fox jumps over the lazy dog", "xyz" * 12, "12", "MoE layers route",
         "def f(x):\n    return", "zz"]


def tiny(preset: str = "tiny", seed: int = 0, dtype=torch.float32) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(PRESETS[preset]()).to(dtype).eval()


@pytest.fixture(scope="module")
def model():
    return tiny()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0)


def alone(model, prompt: list[int], n: int) -> list[int]:
    return list(sample_tokens(model, prompt, n, temperature=0))


@pytest.mark.parametrize("seed", [0, 1])
def test_requests_of_different_lengths_joining_and_leaving_get_the_tokens_they_get_alone(seed):
    model = tiny(seed=seed)
    prompts = [TOK.encode(t) for t in TEXTS]
    n_new = [5, 21, 9, 14, 30, 7, 3, 12]
    # 3 slots for 8 requests and 16-token prompt chunks: requests wait, join mid-run, long prompts take several
    # steps while others decode, and every finish moves the last row
    eng = Engine(model, TOK, EngineConfig(max_batch=3, prefill_chunk=16))
    res = eng.generate(prompts, [greedy(n) for n in n_new])
    for p, n, r in zip(prompts, n_new, res):
        ref = alone(model, p, n)
        assert r.token_ids == ref
        assert r.text == TOK.decode(ref) and r.finish_reason == "length"
        assert (r.prompt_tokens, r.completion_tokens) == (len(p), n)
    assert eng.stats()["free_slots"] == 3


def test_requests_submitted_while_others_run_join_at_the_next_step(model):
    eng = Engine(model, TOK, EngineConfig(max_batch=4, prefill_chunk=8))
    prompts = [TOK.encode(t) for t in TEXTS[:5]]
    handles = [eng.submit(prompts[0], greedy(20))]
    got: dict[str, list[int]] = {}
    step = 0
    while eng.has_work() or step < 4:
        if 1 <= step <= 4:  # one new request per step, into a batch that is decoding
            handles.append(eng.submit(prompts[step], greedy(6 + 3 * step)))
        eng.step()
        step += 1
    for h in handles:
        got[h.request_id] = [t for o in h.outputs() for t in o.token_ids]
    for i, h in enumerate(handles):
        assert got[h.request_id] == alone(model, prompts[i], 20 if i == 0 else 6 + 3 * i)


def test_events_stream_deltas_that_add_up_to_the_text(model):
    eng = Engine(model, TOK, EngineConfig(max_batch=2))
    h = eng.submit(TOK.encode("hello"), greedy(12))
    outs = list(h.outputs())
    assert outs[-1].finished and all(not o.finished for o in outs[:-1])
    ref = alone(model, TOK.encode("hello"), 12)
    assert [t for o in outs for t in o.token_ids] == ref
    assert "".join(o.text for o in outs) == TOK.decode(ref)
    assert [o.completion_tokens for o in outs if o.token_ids] == list(range(1, 13))


def test_a_stop_string_ends_the_text_before_it_even_across_tokens(model):
    prompt = TOK.encode("abc")
    ref_text = TOK.decode(alone(model, prompt, 40))
    # a stop string of two characters taken from the middle of the greedy continuation
    stop = ref_text[10:12]
    assert len(stop.encode()) >= 2
    eng = Engine(model, TOK, EngineConfig(max_batch=2))
    outs = list(eng.submit(prompt, SamplingParams(max_tokens=40, temperature=0, stop=(stop, "never-there"))).outputs())
    text = "".join(o.text for o in outs)
    assert text == ref_text[:ref_text.find(stop)]
    assert outs[-1].finish_reason == "stop"
    assert stop not in text


def test_stop_token_ids_and_end_of_text_end_a_request_without_their_token(model):
    prompt = TOK.encode("hello")
    ref = alone(model, prompt, 20)
    eng = Engine(model, TOK, EngineConfig(max_batch=2))
    r = eng.generate([prompt], SamplingParams(max_tokens=20, temperature=0, stop_token_ids=(ref[6],)))[0]
    first = ref.index(ref[6])
    assert r.token_ids == ref[:first] and r.finish_reason == "stop" and r.completion_tokens == first + 1
    eng.eot_id = ref[3]  # a tokenizer's end-of-text id; ignore_eos runs past it
    r = eng.generate([prompt], greedy(20))[0]
    assert r.token_ids == ref[:ref.index(ref[3])] and r.finish_reason == "stop"
    r = eng.generate([prompt], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    assert r.token_ids == ref


def test_seeded_sampling_draws_the_same_tokens_alone_or_batched(model):
    prompts = [TOK.encode(t) for t in TEXTS[:4]]
    params = [SamplingParams(max_tokens=15, temperature=0.9, top_p=0.9, top_k=40, seed=100 + i) for i in range(4)]
    solo = [Engine(model, TOK, EngineConfig(max_batch=1)).generate([p], sp)[0].token_ids
            for p, sp in zip(prompts, params)]
    batched = Engine(model, TOK, EngineConfig(max_batch=4)).generate(prompts, params)
    assert [r.token_ids for r in batched] == solo
    other = Engine(model, TOK).generate([prompts[0]], SamplingParams(max_tokens=15, temperature=0.9, seed=7))[0]
    assert other.token_ids != solo[0]


def test_cancel_frees_the_slot_and_the_others_go_on(model):
    eng = Engine(model, TOK, EngineConfig(max_batch=2))
    keep = eng.submit(TOK.encode("keep"), greedy(15))
    gone = eng.submit(TOK.encode("gone"), greedy(50))
    waiting = eng.submit(TOK.encode("queued"), greedy(5))
    for _ in range(3):
        eng.step()
    assert eng.stats()["free_slots"] == 0
    gone.cancel()
    waiting.cancel()
    eng.step()
    assert eng.stats()["waiting"] == 0 and eng.stats()["free_slots"] == 1
    outs = list(gone.outputs())
    assert outs[-1].finish_reason == "cancelled" and 0 < outs[-1].completion_tokens < 50
    assert list(waiting.outputs())[-1].finish_reason == "cancelled"
    assert [t for o in keep.outputs() for t in o.token_ids] == alone(model, TOK.encode("keep"), 15)
    assert eng.stats()["free_slots"] == 2 and eng.metrics.finished["cancelled"] == 2


def test_the_kv_budget_sets_the_slots_and_extra_requests_wait_for_one(model):
    per = slot_bytes(model.config, model.config.max_seq_len, torch.float32)
    eng = Engine(model, TOK, EngineConfig(max_batch=16, kv_cache_gb=2.5 * per / 2**30))
    assert eng.stats()["slots"] == 2 and eng.slots.nbytes == 2 * per
    prompts = [TOK.encode(t) for t in TEXTS[:5]]
    res = eng.generate(prompts, greedy(6))
    assert [r.token_ids for r in res] == [alone(model, p, 6) for p in prompts]
    with pytest.raises(ValueError, match="kv_cache_gb"):
        Engine(model, TOK, EngineConfig(kv_cache_gb=0.5 * per / 2**30))


def test_a_full_queue_a_long_prompt_and_bad_values_are_refused_clearly(model):
    eng = Engine(model, TOK, EngineConfig(max_batch=1, max_queue=2))
    eng.submit([1, 2], greedy(3))
    eng.submit([1, 2], greedy(3))
    with pytest.raises(QueueFull, match="queue is full"):
        eng.submit([1, 2], greedy(3))
    ctx = model.config.max_seq_len
    with pytest.raises(PromptTooLong, match=f"context is {ctx}"):
        eng.submit([1] * (ctx - 2), greedy(3))
    with pytest.raises(ValueError, match="prompt"):
        eng.submit([], greedy(3))
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        eng.submit([1, 999], greedy(3))
    for field, value in [("max_tokens", 0), ("temperature", -1.0), ("top_p", 0.0), ("top_k", -2), ("seed", -1),
                         ("presence_penalty", 3.0), ("frequency_penalty", float("nan")), ("stop", ("",))]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**{field: value})
    for name, value in [("max_batch", 0), ("max_queue", 0), ("prefill_chunk", 0), ("max_seq_len", 1)]:
        with pytest.raises(ValueError, match=name):
            EngineConfig(**{name: value})


def test_the_engine_thread_serves_submitters_on_other_threads_and_drains_on_shutdown(model):
    eng = Engine(model, TOK, EngineConfig(max_batch=4))
    eng.start()
    prompts = [TOK.encode(t) for t in TEXTS]
    got: dict[int, list[int]] = {}

    def client(i: int) -> None:
        got[i] = [t for o in eng.submit(prompts[i], greedy(8 + i)).outputs() for t in o.token_ids]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    late = eng.submit(prompts[0], greedy(30))
    eng.shutdown(drain=True, timeout=60)
    assert got == {i: alone(model, p, 8 + i) for i, p in enumerate(prompts)}
    assert [t for o in late.outputs() for t in o.token_ids] == alone(model, prompts[0], 30)
    with pytest.raises(EngineStopped):
        eng.submit(prompts[0], greedy(3))
    assert not eng.running_thread


def test_shutdown_without_drain_cancels_what_is_left(model):
    eng = Engine(model, TOK, EngineConfig(max_batch=1))
    hs = [eng.submit(TOK.encode("x"), greedy(40)) for _ in range(3)]
    eng.step()
    eng.shutdown(drain=False)
    assert [list(h.outputs())[-1].finish_reason for h in hs] == ["cancelled"] * 3


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(model, monkeypatch):
    eng = Engine(model, TOK, EngineConfig(max_batch=2))
    h = eng.submit(TOK.encode("boom"), greedy(10))
    eng.step()
    import moekit.serve.engine as engine_mod

    def broken(*a, **k):
        raise RuntimeError("expert file truncated")

    monkeypatch.setattr(engine_mod, "decode_step", broken)
    eng.step()
    out = list(h.outputs())[-1]
    assert out.finish_reason == "error" and "expert file truncated" in out.error
    monkeypatch.undo()
    assert eng.generate([TOK.encode("fine")], greedy(5))[0].token_ids == alone(model, TOK.encode("fine"), 5)


def test_expert_load_counts_every_served_token_in_every_moe_layer(model):
    eng = Engine(model, TOK, EngineConfig(max_batch=3))
    prompts = [TOK.encode(t) for t in TEXTS[:4]]
    eng.generate(prompts, greedy(6))
    fed = sum(len(p) for p in prompts) + 5 * len(prompts)  # the prompts and every generated token but the last
    K, E = model.config.moe.top_k, model.config.moe.n_experts
    load = eng.metrics.expert_load()
    assert len(load) == len(model.moe_layers) and all(len(row) == E for row in load)
    assert all(sum(row) == fed * K for row in load)
    text = eng.metrics.prometheus()
    assert 'moekit_expert_load_total{layer="0",expert="0"}' in text
    assert 'moekit_requests_finished_total{finish_reason="length"} 4' in text
    assert f"moekit_prompt_tokens_total {sum(len(p) for p in prompts)}" in text


def test_the_latent_cache_of_mla_batches_too():
    model = tiny("tiny-mla")
    prompts = [TOK.encode(t) for t in TEXTS[:4]]
    res = Engine(model, TOK, EngineConfig(max_batch=2, prefill_chunk=8)).generate(prompts, greedy(7))
    assert [r.token_ids for r in res] == [alone(model, p, 7) for p in prompts]


def test_a_compressed_model_serves_the_tokens_it_generates_alone(tmp_path, model):
    from moekit.compress import compress
    from moekit.formats import from_pretrained

    model.save_pretrained(tmp_path / "src")
    TOK.save(tmp_path / "src")
    compress(tmp_path / "src", tmp_path / "q", bits=4, mixed=False, group_size=32, progress=False)
    q = from_pretrained(tmp_path / "q").eval()
    prompts = [TOK.encode(t) for t in TEXTS[:3]]
    res = Engine(q, TOK, EngineConfig(max_batch=2)).generate(prompts, greedy(6))
    assert [r.token_ids for r in res] == [alone(q, p, 6) for p in prompts]
