"""The generation engine: continuous batching over a fixed set of KV slots.

Legend: B sequences decoded this step, S prompt tokens in a chunk, V vocab.

One engine step, as vLLM's scheduler runs it (requests join and leave the running batch at every step):

    cancel   requests the client gave up on leave (their slot is freed now, not at their end)
    admit    waiting requests take free slots, oldest first, while slots are free
    prefill  prompts run into their slots, up to ``prefill_chunk`` prompt tokens per step in all (a long prompt
             takes several steps, so the running sequences keep decoding between its chunks); a prompt whose last
             chunk ran samples its first token
    decode   every running sequence that has a token to feed advances one token, all in one batched forward
             (each row at its own length: ``moekit.model.decode.decode_step`` on a ragged cache view)
    sample   one token per row (``sampling.sample``: each request's own parameters and generator)
    finish   end-of-text / stop ids / stop strings / max_tokens / the context end a request; its slot is freed
             and the last row moves into it (``slots.KVSlots``)

Prefill and decode run as separate forwards within a step: a prompt chunk is a wide GEMM batch, a decode step a
few rows through the bandwidth-bound kernels; fused into one ragged forward the decode rows would lose their fast
path. Greedy requests get the tokens ``moekit generate`` gives for the same prompt, alone or in any batch
(tests/serve/test_engine.py), because every row attends only to its own slot and the batched step computes each
row as the single-sequence step does.

Requests are submitted from any thread (``submit``); the engine runs on its own thread (``start``) or is driven
step by step by the caller (``step``, ``generate``). Each request's events (``RequestOutput``) go to its ``sink``
on the engine thread, or to a queue its handle reads.
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from moekit.model import precision
from moekit.model.decode import decode_step
from moekit.model.transformer import Transformer
from moekit.serve.metrics import EngineMetrics, load_counters
from moekit.serve.sampling import SamplingParams, sample
from moekit.serve.slots import KVSlots, slot_bytes

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The waiting queue is at ``max_queue`` (HTTP 429)."""


class EngineStopped(RuntimeError):
    """The engine is shutting down and takes no new request (HTTP 503)."""


class PromptTooLong(ValueError):
    """A prompt (with its max_tokens) does not fit the served context."""


@dataclass
class EngineConfig:
    """How the engine batches and how much memory it holds. ``kv_cache_gb`` bounds the KV cache: the engine holds
    as many slots as fit (at most ``max_batch``), each of ``max_seq_len`` positions, allocated once at start."""

    max_batch: int = 16
    max_seq_len: int | None = None  # None: the model's context
    kv_cache_gb: float | None = None  # None: max_batch slots
    max_queue: int = 64
    prefill_chunk: int = 256
    expert_load: bool = True  # count each MoE layer's router assignments over served tokens (metrics)

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "prefill_chunk"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {v!r}")
        if self.max_seq_len is not None and (not isinstance(self.max_seq_len, int) or self.max_seq_len < 2):
            raise ValueError(f"max_seq_len: must be an integer >= 2, got {self.max_seq_len!r}")
        if self.kv_cache_gb is not None and not self.kv_cache_gb > 0:
            raise ValueError(f"kv_cache_gb: must be > 0, got {self.kv_cache_gb!r}")


@dataclass
class RequestOutput:
    """One event of one request: the tokens and text new since its last event (stop strings removed)."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Completion:
    """A finished request, whole (``Engine.generate``)."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


@dataclass
class _Seq:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    sink: Callable[[RequestOutput], None]
    generator: torch.Generator | None
    submitted: float
    cached: int = 0  # positions of its slot written (prompt chunks, then fed tokens)
    out: list[int] = field(default_factory=list)
    pending: int | None = None  # the sampled token the next decode step feeds
    generated: int = 0  # tokens sampled (out plus an end-of-text / stop id that ended it)
    text: str = ""  # the final text so far (stop strings cut)
    emitted: int = 0  # characters of text sent
    first_at: float | None = None
    last_at: float | None = None
    finish_reason: str | None = None  # set when a token ends it; the slot is freed at the end of the step
    cut: bool = False  # a stop string cut the text: it is final


class RequestHandle:
    """What ``submit`` returns: the request's id, its events (when no sink was given) and ``cancel``."""

    def __init__(self, engine: Engine, request_id: str, events: queue.SimpleQueue | None):
        self.engine, self.request_id, self._events = engine, request_id, events

    def cancel(self) -> None:
        self.engine.cancel(self.request_id)

    def outputs(self) -> Iterator[RequestOutput]:
        """The request's events until it finishes; drives the engine itself when no engine thread runs."""
        if self._events is None:
            raise RuntimeError("outputs: this request's events go to the sink given to submit")
        while True:
            if self.engine.running_thread:
                out = self._events.get()
            else:
                while self._events.empty():
                    self.engine.step()
                out = self._events.get()
            yield out
            if out.finished:
                return


class Engine:
    def __init__(self, model: Transformer, tokenizer=None, config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.eot_id = None if tokenizer is None else tokenizer.eot_id
        ctx = model.config.max_seq_len
        self.max_seq_len = min(self.config.max_seq_len or ctx, ctx)
        p = next(model.parameters())
        per_slot = slot_bytes(model.config, self.max_seq_len, p.dtype)
        slots = self.config.max_batch
        if self.config.kv_cache_gb is not None:
            fit = int(self.config.kv_cache_gb * 2**30 // per_slot)
            if fit < 1:
                raise ValueError(f"kv_cache_gb: {self.config.kv_cache_gb} GB holds no sequence of {self.max_seq_len} "
                                 f"positions ({per_slot / 2**30:.4f} GB each); raise it or lower max_seq_len")
            slots = min(slots, fit)
        self.slots = KVSlots(model.config, slots, self.max_seq_len, p.device, p.dtype)
        self.device = p.device
        self.act_dtype = precision.activation_dtype(model)
        self.metrics = EngineMetrics(load_counters(model.moe_layers) if self.config.expert_load else None)
        # generated-token counts per slot, for the repetition penalties
        self.counts_NV = torch.zeros(slots, model.config.vocab_size, dtype=torch.int32)
        self._rows: list[_Seq] = []  # row i of the cache belongs to _rows[i]
        self._ready = 0  # rows 0.._ready-1 decode (past their prompt); the rest are still in their prompt
        self._waiting: collections.deque[_Seq] = collections.deque()
        self._cancel: set[str] = set()
        self._ids = itertools.count()
        self._cv = threading.Condition()
        self._accepting = True
        self._thread: threading.Thread | None = None
        self._stop = False

    # ------------------------------------------------------------------ requests
    def submit(self, prompt_ids: list[int], params: SamplingParams | None = None,
               sink: Callable[[RequestOutput], None] | None = None, request_id: str | None = None,
               _bypass_queue: bool = False) -> RequestHandle:
        """Queue a request (thread-safe). Raises ``PromptTooLong`` when the prompt and its max_tokens pass the
        context, ``ValueError`` for a bad prompt, ``QueueFull`` past ``max_queue`` waiting requests,
        ``EngineStopped`` while shutting down."""
        params = params or SamplingParams()
        prompt = list(prompt_ids)
        if not prompt:
            raise ValueError("prompt: must hold at least one token")
        V = self.model.config.vocab_size
        bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt: token ids must be integers in [0, {V}), got {bad[0]!r}")
        if len(prompt) + params.max_tokens > self.max_seq_len:
            raise PromptTooLong(f"max_tokens: the context is {self.max_seq_len} tokens; the prompt has {len(prompt)} "
                                f"and max_tokens asks for {params.max_tokens} more "
                                f"({len(prompt) + params.max_tokens} in all)")
        events = None
        if sink is None:
            events = queue.SimpleQueue()
            sink = events.put
        rid = request_id or f"req-{next(self._ids)}"
        seq = _Seq(rid, prompt, params, sink, params.generator(), time.perf_counter())
        with self._cv:
            if not self._accepting:
                raise EngineStopped("the engine is shutting down and takes no new request")
            if not _bypass_queue and len(self._waiting) >= self.config.max_queue:
                raise QueueFull(f"the queue is full ({self.config.max_queue} requests waiting); retry later")
            self._waiting.append(seq)
            self._cv.notify_all()
        return RequestHandle(self, rid, events)

    def cancel(self, request_id: str) -> None:
        """Finish a request with "cancelled" at the next step and free its slot (thread-safe; unknown ids and
        finished requests are ignored)."""
        with self._cv:
            self._cancel.add(request_id)
            self._cv.notify_all()

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 ) -> list[Completion]:
        """Run a batch of prompts to completion (offline): every prompt is queued at once (past ``max_queue`` too)
        and they share the slots as served requests do."""
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"params: {len(plist)} for {len(prompts)} prompts")
        handles = [self.submit(p, sp, _bypass_queue=True) for p, sp in zip(prompts, plist)]
        results = []
        for h in handles:
            ids, text, last = [], [], None
            for out in h.outputs():
                ids += out.token_ids
                text.append(out.text)
                last = out
            results.append(Completion(h.request_id, ids, "".join(text), last.finish_reason, last.prompt_tokens,
                                      last.completion_tokens, last.error))
        return results

    def stats(self) -> dict:
        with self._cv:
            return {"slots": self.slots.slots, "running": len(self._rows), "waiting": len(self._waiting),
                    "free_slots": self.slots.slots - len(self._rows), "kv_cache_bytes": self.slots.nbytes,
                    "max_seq_len": self.max_seq_len, "accepting": self._accepting}

    def has_work(self) -> bool:
        return bool(self._rows or self._waiting or self._cancel)

    # ------------------------------------------------------------------ the background thread
    @property
    def running_thread(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Run the step loop on a background thread (idempotent)."""
        if self.running_thread:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="moekit-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self.has_work():
                    self._cv.wait()
                if self._stop:
                    return
            self.step()

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; with ``drain`` let the queued and running ones finish (at most ``timeout``
        seconds), then cancel what is left and stop the thread."""
        with self._cv:
            self._accepting = False
        deadline = None if timeout is None else time.monotonic() + timeout
        if drain:
            while self.has_work() and (deadline is None or time.monotonic() < deadline):
                if self.running_thread:
                    time.sleep(0.01)
                else:
                    self.step()
        with self._cv:
            self._cancel.update(s.request_id for s in (*self._rows, *self._waiting))
        if self.running_thread:
            while self.has_work():
                time.sleep(0.005)
        elif self.has_work():
            self.step()
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()

    # ------------------------------------------------------------------ one step
    @torch.no_grad()
    def step(self) -> int:
        """One engine step (see the module docstring); returns the tokens generated."""
        try:
            self._apply_cancels()
            self._admit()
            made = self._prefill()
            made += self._decode()
        except Exception as e:  # a failing step fails its requests, not the engine
            log.exception("engine step failed")
            for i in reversed(range(len(self._rows))):
                self._finish(i, "error", error=f"{type(e).__name__}: {e}")
            made = 0
        with self.metrics.lock:
            self.metrics.steps += 1
            self.metrics.running, self.metrics.waiting = len(self._rows), len(self._waiting)
        return made

    def _apply_cancels(self) -> None:
        with self._cv:
            if not self._cancel:
                return
            ids, self._cancel = self._cancel, set()
            gone = [s for s in self._waiting if s.request_id in ids]
            for s in gone:
                self._waiting.remove(s)
        for s in gone:
            self._emit(s, [], finished=True, reason="cancelled")
            with self.metrics.lock:
                self.metrics.finished["cancelled"] = self.metrics.finished.get("cancelled", 0) + 1
        for i in reversed(range(len(self._rows))):
            if self._rows[i].request_id in ids:
                self._finish(i, "cancelled")

    def _admit(self) -> None:
        with self._cv:
            while self._waiting and len(self._rows) < self.slots.slots:
                seq = self._waiting.popleft()
                self.counts_NV[len(self._rows)].zero_()
                self._rows.append(seq)

    def _prefill(self) -> int:
        """Prompt chunks, oldest request first, up to ``prefill_chunk`` tokens in all this step."""
        budget, made = self.config.prefill_chunk, 0
        for row in range(self._ready, len(self._rows)):
            if budget <= 0:
                break
            seq = self._rows[row]
            chunk = seq.prompt[seq.cached:seq.cached + budget]
            ids_1S = torch.tensor([chunk], device=self.device)
            logits = self.model(ids_1S, cache=self.slots.prefill_view(row, seq.cached), aux=False, logits_to_keep=1,
                                activation_dtype=self.act_dtype).logits[:, -1]
            seq.cached += len(chunk)
            budget -= len(chunk)
            with self.metrics.lock:
                self.metrics.prompt_tokens += len(chunk)
            if seq.cached == len(seq.prompt):
                # (rows before this one finished their prompts this step, so it is row n_ready: no move)
                assert row == self._ready
                self._ready += 1
                token = sample(logits, [seq.params], [seq.generator], self._counts([row], [seq]))[0]
                self._accept(row, seq, token)
                made += 1
            else:
                break  # the budget ran out inside this prompt
        self._finish_done()
        return made

    def _decode(self) -> int:
        """One token for every sequence past its prompt: rows 0..n_ready-1, one batched step."""
        n = self._ready
        if n == 0:
            return 0
        seqs = self._rows[:n]
        feed_B1 = torch.tensor([s.pending for s in seqs], device=self.device)[:, None]
        logits_BV = decode_step(self.model, feed_B1, self.slots.decode_view([s.cached for s in seqs]))[:, -1]
        with self.metrics.lock:
            self.metrics.batch_size.observe(n)
        for s in seqs:
            s.cached += 1
            s.pending = None
        tokens = sample(logits_BV, [s.params for s in seqs], [s.generator for s in seqs],
                        self._counts(list(range(n)), seqs))
        for i, (s, t) in enumerate(zip(seqs, tokens)):
            self._accept(i, s, t)
        self._finish_done()
        return n

    def _counts(self, rows: list[int], seqs: list[_Seq]) -> Tensor | None:
        return self.counts_NV[rows] if any(s.params.penalised for s in seqs) else None

    # ------------------------------------------------------------------ tokens in, events out
    def _accept(self, row: int, seq: _Seq, token: int) -> None:
        """Take a sampled token: end the request or queue the token for the next decode step, and emit its text."""
        now = time.perf_counter()
        with self.metrics.lock:
            self.metrics.generation_tokens += 1
            if seq.first_at is None:
                self.metrics.ttft.observe(now - seq.submitted)
            else:
                self.metrics.itl.observe(now - seq.last_at)
        seq.first_at = seq.first_at or now
        seq.last_at = now
        seq.generated += 1
        p = seq.params
        if token in p.stop_token_ids or (token == self.eot_id and not p.ignore_eos):
            seq.finish_reason = "stop"
            self._emit(seq, [], finished=False)
            return
        seq.out.append(token)
        if p.penalised:
            self.counts_NV[row, token] += 1
        reason = None
        if self.tokenizer is not None:
            full = self.tokenizer.decode(seq.out)
            if p.stop:
                # a stop string may start in the characters already held back: search from there
                start = max(0, len(seq.text) - p.stop_max_len)
                hits = [j for s in p.stop if (j := full.find(s, start)) >= 0]
                if hits:
                    full, reason, seq.cut = full[:min(hits)], "stop", True
            if not full.endswith("\ufffd") or reason:  # (a byte-level token can end mid-character)
                seq.text = full
        if reason is None and (seq.generated >= p.max_tokens or seq.cached >= self.max_seq_len):
            reason = "length"
        if reason is None:
            seq.pending = token
            self._emit(seq, [token], finished=False)
        else:
            seq.finish_reason = reason
            self._emit(seq, [token], finished=False)

    def _emit(self, seq: _Seq, token_ids: list[int], finished: bool, reason: str | None = None,
              error: str | None = None) -> None:
        # while running, hold back what could still turn out to be the start of a stop string
        end = len(seq.text) if finished else max(seq.emitted, len(seq.text) - max(seq.params.stop_max_len - 1, 0))
        delta, seq.emitted = seq.text[seq.emitted:end], max(seq.emitted, end)
        if not token_ids and not delta and not finished:
            return
        seq.sink(RequestOutput(seq.request_id, token_ids, delta, finished, reason if finished else None, error,
                               len(seq.prompt), seq.generated))

    def _finish_done(self) -> None:
        for i in reversed(range(len(self._rows))):
            s = self._rows[i]
            if s.finish_reason is not None:
                self._finish(i, s.finish_reason)

    def _finish(self, row: int, reason: str, error: str | None = None) -> None:
        """End the request in ``row``: its final event, metrics, and its slot freed (the last row moves in)."""
        seq = self._rows[row]
        if self.tokenizer is not None and not seq.cut:  # the whole text now, a last partial character included
            seq.text = self.tokenizer.decode(seq.out)
        self._emit(seq, [], finished=True, reason=reason, error=error)
        with self.metrics.lock:
            self.metrics.finished[reason] = self.metrics.finished.get(reason, 0) + 1
            self.metrics.e2e.observe(time.perf_counter() - seq.submitted)
        # keep rows 0..n_ready-1 the decoding sequences and the ones still in their prompt after them
        if row < self._ready:
            self._ready -= 1
            self._move(self._ready, row)
            row = self._ready
        self._move(len(self._rows) - 1, row)
        self._rows.pop()

    def _move(self, src: int, dst: int) -> None:
        """Row ``src``'s sequence, cache and counts into row ``dst`` (whose sequence has left)."""
        if src != dst:
            moved = self._rows[src]
            self.slots.move(src, dst, moved.cached)
            self.counts_NV[dst] = self.counts_NV[src]
            self._rows[dst] = moved
