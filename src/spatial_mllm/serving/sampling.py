"""Choosing each row's next token with that row's own settings (greedy, temperature, top-p, seed), which a batched
`generate` call cannot do: its logits processors apply one setting to every row."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # same seed, same prompt, same model: same text
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # run to max_new_tokens (benchmarks want fixed-length answers)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self, offset: int = 0) -> torch.Generator | None:
        """The row's random stream; choice `offset` of a request with n > 1 gets seed + offset."""
        if self.greedy:
            return None
        seed = secrets.randbits(63) if self.seed is None else (self.seed + offset) % 2**63
        return torch.Generator().manual_seed(seed)


def top_p_filter(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Logits outside each row's nucleus (smallest set of tokens with probability >= top_p) set to -inf."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each one
    drop_sorted = before >= top_p.unsqueeze(-1)
    drop_sorted[:, 0] = False  # the most likely token always stays
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_tokens(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """One token per row of `logits` (batch, vocab)."""
    logits = logits.float().cpu()  # row generators are CPU generators; a vocabulary-sized copy is cheap
    chosen = logits.argmax(dim=-1)
    sampled = [row for row, p in enumerate(params) if not p.greedy]
    if sampled:
        rows = torch.tensor(sampled)
        temperature = torch.tensor([params[r].temperature for r in sampled]).unsqueeze(-1)
        top_p = torch.tensor([params[r].top_p for r in sampled])
        probs = top_p_filter(logits[rows] / temperature, top_p).softmax(dim=-1)
        for k, row in enumerate(sampled):
            chosen[row] = torch.multinomial(probs[k], 1, generator=generators[row])[0]
    return chosen.tolist()


__all__ = ["SamplingParams", "next_tokens", "top_p_filter"]
