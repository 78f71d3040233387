"""The engine's counters and histograms, and their Prometheus text (exposition format 0.0.4).

Legend: L MoE layers, E experts.

What a serving operator watches (the names follow vLLM's ``vllm:*`` metrics where one exists): requests by how they
finished, prompt and generated tokens, queue depth and running sequences (gauges), the decode batch size, time to
first token, inter-token latency and request latency (histograms), and, for an MoE model, each layer's expert
load over the tokens served: the hotspots that make one expert the bottleneck of a batch. The engine thread writes;
a scrape reads under the same lock, so a scrape sees one consistent step.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field

import torch
from torch import Tensor

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class Histogram:
    """Cumulative-bucket histogram (Prometheus semantics: bucket ``le`` counts observations <= le)."""

    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def mean(self) -> float | None:
        return self.total / self.n if self.n else None

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for le, c in zip((*self.buckets, "+Inf"), self.counts):
            running += c
            out.append(f'{name}_bucket{{le="{le}"}} {running}')
        return [*out, f"{name}_sum {self.total:.6f}", f"{name}_count {self.n}"]


class EngineMetrics:
    """Everything ``/metrics`` shows of the engine. ``expert_load_LE`` are the MoE layers' own device counters
    (``MoE.load_counter_E``), read only when scraped."""

    def __init__(self, expert_load_LE: list[Tensor] | None = None):
        self.lock = threading.Lock()
        self.finished: dict[str, int] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.steps = 0
        self.running = 0
        self.waiting = 0
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.itl = Histogram(LATENCY_BUCKETS)
        self.e2e = Histogram(LATENCY_BUCKETS)
        self.expert_load_LE = expert_load_LE or []

    def expert_load(self) -> list[list[int]]:
        """Assignments per expert for each MoE layer over every token served so far (prompt and generated)."""
        return [c.tolist() for c in self.expert_load_LE]

    def snapshot(self) -> dict:
        """The figures as plain values (benchmarks write them as JSON)."""
        with self.lock:
            return {"finished": dict(self.finished), "prompt_tokens": self.prompt_tokens,
                    "generation_tokens": self.generation_tokens, "steps": self.steps, "running": self.running,
                    "waiting": self.waiting, "mean_batch_size": self.batch_size.mean(),
                    "mean_ttft_s": self.ttft.mean(), "mean_itl_s": self.itl.mean(), "mean_e2e_s": self.e2e.mean(),
                    "expert_load": self.expert_load()}

    def prometheus(self) -> str:
        """The Prometheus text exposition of the engine's figures."""
        p = "moekit_"
        with self.lock:
            lines = [f"# HELP {p}requests_finished_total Requests finished, by finish reason.",
                     f"# TYPE {p}requests_finished_total counter"]
            for reason in sorted({"stop", "length", "cancelled", "error", *self.finished}):
                lines.append(f'{p}requests_finished_total{{finish_reason="{reason}"}} {self.finished.get(reason, 0)}')
            for name, help_, kind, value in (
                    ("prompt_tokens_total", "Prompt tokens prefilled.", "counter", self.prompt_tokens),
                    ("generation_tokens_total", "Tokens generated.", "counter", self.generation_tokens),
                    ("engine_steps_total", "Engine steps run.", "counter", self.steps),
                    ("num_requests_running", "Sequences holding a KV slot.", "gauge", self.running),
                    ("num_requests_waiting", "Requests queued for a slot.", "gauge", self.waiting)):
                lines += [f"# HELP {p}{name} {help_}", f"# TYPE {p}{name} {kind}", f"{p}{name} {value}"]
            for name, help_, h in (
                    ("batch_size", "Sequences decoded together per step.", self.batch_size),
                    ("time_to_first_token_seconds", "From submission to the first token.", self.ttft),
                    ("inter_token_latency_seconds", "Between successive tokens of a request.", self.itl),
                    ("e2e_request_latency_seconds", "From submission to the last token.", self.e2e)):
                lines += [f"# HELP {p}{name} {help_}", f"# TYPE {p}{name} histogram", *h.lines(p + name)]
            if self.expert_load_LE:
                lines += [f"# HELP {p}expert_load_total Router assignments per MoE layer and expert, over served "
                          "tokens.", f"# TYPE {p}expert_load_total counter"]
                for layer, counts in enumerate(self.expert_load()):
                    lines += [f'{p}expert_load_total{{layer="{layer}",expert="{e}"}} {c}' for e, c in enumerate(counts)]
        return "\n".join(lines) + "\n"


def load_counters(moe_layers: list) -> list[Tensor]:
    """Give every MoE layer a new assignment counter (``MoE.load_counter_E``, from zero) and return them."""
    for moe in moe_layers:
        moe.load_counter_E = torch.zeros(moe.config.n_experts, dtype=torch.long, device=moe.router.weight.device)
    return [moe.load_counter_E for moe in moe_layers]
