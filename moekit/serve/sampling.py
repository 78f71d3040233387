"""Per-request sampling: the parameters a request asks for (validated) and one batched sampler for a step's rows.

Legend: B rows (the sequences sampled this step), V vocab.

Every row has its own parameters and its own ``torch.Generator`` (seeded by the request's ``seed``, else from
the process's entropy), so a seeded request draws the same tokens alone or in any batch. The logits transforms
run over the whole batch at once (penalties, temperature, top-k, top-p); only the one uniform number per sampled
row is drawn row by row, from that row's generator (a loop over sequences, never over tokens or vocab).

Order of the transforms, as vLLM and transformers apply them: repetition penalties on the raw logits, then
temperature, then top-k, then top-p (nucleus, Holtzman et al. 2020: the smallest set of tokens whose probability
reaches top_p), then one draw from the renormalised distribution. Temperature 0 is greedy (argmax of the
penalised logits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class SamplingParams:
    """What one request asks of the sampler. ``__post_init__`` validates and raises ``ValueError`` naming the field.

    ``stop`` strings end the completion and are not part of its text; ``stop_token_ids`` (and the tokenizer's
    end-of-text id unless ``ignore_eos``) end it without being part of its text. Penalties follow OpenAI's
    definition over the tokens generated so far: ``logit -= frequency_penalty * count + presence_penalty *
    (count > 0)``, each in [-2, 2]."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # (derived) the longest stop string: the engine holds back that many characters minus one while streaming
    stop_max_len: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        self.stop_token_ids = tuple(self.stop_token_ids)
        _int_at_least("max_tokens", self.max_tokens, 1)
        _int_at_least("top_k", self.top_k, 0)
        _finite_in("temperature", self.temperature, 0.0, math.inf)
        _finite_in("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _finite_in("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if not isinstance(self.top_p, (int, float)) or isinstance(self.top_p, bool) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None:
            _int_at_least("seed", self.seed, 0)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop: every stop sequence must be a non-empty string, got {s!r}")
        for t in self.stop_token_ids:
            _int_at_least("stop_token_ids", t, 0)
        self.stop_max_len = max((len(s) for s in self.stop), default=0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def penalised(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0

    def generator(self) -> torch.Generator | None:
        """The request's own generator (None for greedy requests: they draw nothing)."""
        if self.greedy:
            return None
        g = torch.Generator()
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


def _int_at_least(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name}: must be an integer >= {low}, got {value!r}")


def _finite_in(name: str, value, low: float, high: float) -> None:
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
            or not low <= value <= high):
        bounds = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
        raise ValueError(f"{name}: must be a finite number {bounds}, got {value!r}")


@torch.no_grad()
def sample(logits_BV: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           counts_BV: Tensor | None = None) -> list[int]:
    """One token per row. ``counts_BV``: each row's generated-token counts (for the penalties; None: no row is
    penalised). Greedy rows take the argmax; the others one draw each from their own generator."""
    logits_BV = logits_BV.float()
    B, V = logits_BV.shape
    if counts_BV is not None and any(p.penalised for p in params):
        freq_B1 = torch.tensor([p.frequency_penalty for p in params])[:, None]
        pres_B1 = torch.tensor([p.presence_penalty for p in params])[:, None]
        c_BV = counts_BV.to(logits_BV.dtype)
        logits_BV = logits_BV - freq_B1 * c_BV - pres_B1 * (c_BV > 0).to(logits_BV.dtype)
    tokens = logits_BV.argmax(-1).tolist()
    drawn = [b for b, p in enumerate(params) if not p.greedy]
    if not drawn:
        return tokens
    rows = torch.tensor(drawn)
    temp_R1 = torch.tensor([params[b].temperature for b in drawn])[:, None]
    vals_RV, idx_RV = (logits_BV[rows] / temp_R1).sort(-1, descending=True)
    k_R1 = torch.tensor([params[b].top_k or V for b in drawn])[:, None]
    rank_1V = torch.arange(V)[None, :]
    vals_RV = vals_RV.masked_fill(rank_1V >= k_R1, -math.inf)
    probs_RV = vals_RV.softmax(-1)
    top_p_R1 = torch.tensor([params[b].top_p for b in drawn], dtype=probs_RV.dtype)[:, None]
    # nucleus: drop a token when the tokens ranked above it already reach top_p (the first token always stays)
    before_RV = probs_RV.cumsum(-1) - probs_RV
    probs_RV = probs_RV.masked_fill(before_RV >= top_p_R1, 0.0)
    cdf_RV = probs_RV.cumsum(-1)
    u_R1 = torch.stack([torch.rand((), generator=generators[b]) for b in drawn])[:, None] * cdf_RV[:, -1:]
    # the first rank whose cumulative mass passes u; clamped to the last token with mass (float round-off)
    pick_R = torch.searchsorted(cdf_RV, u_R1, right=True)[:, 0]
    pick_R = torch.minimum(pick_R, (probs_RV > 0).sum(-1) - 1)
    picked = idx_RV.gather(1, pick_R[:, None])[:, 0].tolist()
    for b, t in zip(drawn, picked):
        tokens[b] = t
    return tokens
