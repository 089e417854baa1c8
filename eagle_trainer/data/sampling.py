"""How regeneration draws a reply's ids when it samples: counter-based randomness, no global RNG.

The uniforms of row (conversation i, assistant turn r) at decode step t are a hash of (seed, i, r, t, vocab id):
splitmix64 on int64 tensors (its stream over the vocab ids, keyed by the mixed counters), computed on the logits'
device. Gumbel-max over the temperature-scaled, top-p-filtered logits turns them into a draw. A row's draw so
depends on its own logits and counters alone: the same conversation gets the same reply in any batch, on any
number of ranks, and after a resume.

Shapes: B rows, V vocab; logits [B, V], keys [B] int64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    """How replies are drawn; temperature 0 is greedy (top_p and seed then unused)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature={self.temperature} must be >= 0 and top_p={self.top_p} in (0, 1]")
        if not -(2**63) <= self.seed < 2**63:
            raise ValueError(f"seed={self.seed} does not fit in 64 bits; use a smaller seed")


# Counter-based randomness: splitmix64 on int64 tensors. Multiplication wraps; `>>` on int64 is arithmetic, so
# the logical shift masks the sign bits off.
def _int64(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN, _MIX1, _MIX2 = _int64(0x9E3779B97F4A7C15), _int64(0xBF58476D1CE4E5B9), _int64(0x94D049BB133111EB)


def _shift_right(z: torch.Tensor, s: int) -> torch.Tensor:
    return (z >> s) & ((1 << (64 - s)) - 1)


def splitmix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser, elementwise on an int64 tensor (the bits of the uint64 result)."""
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def _absorb(h: torch.Tensor, x: torch.Tensor | int) -> torch.Tensor:
    """A new key from key h and counter x."""
    x = torch.as_tensor(x, dtype=torch.int64, device=h.device)
    return splitmix64(h ^ splitmix64(x + _GOLDEN))


def row_keys(seed: int, ids: torch.Tensor, turn: int) -> torch.Tensor:
    """[B] int64: the key of each row's randomness, from the seed, its conversation index and the turn. Each is
    absorbed in turn from a zero key; a key that started at the seed's hash would be symmetric in seed and index
    (seed s, conversation i drawing as seed i, conversation s)."""
    return _absorb(_absorb(_absorb(torch.zeros_like(ids), seed), ids), turn)


def uniforms(keys: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """[B, V] float64 in (0, 1): the uniform of every vocab id at decode step `step`; row b depends on keys[b]."""
    h = _absorb(keys, step)  # [B]
    counters = torch.arange(1, vocab + 1, dtype=torch.int64, device=keys.device) * _GOLDEN  # splitmix64's stream
    bits = _shift_right(splitmix64(h[:, None] + counters), 11)  # [B, V] the top 53 bits
    return (bits.double() + 0.5) * 2.0**-53


def sample_next(logits: torch.Tensor, keys: torch.Tensor, step: int, sampling: Sampling) -> torch.Tensor:
    """[B] ids drawn from softmax(logits / temperature) restricted to the top-p nucleus, by Gumbel-max."""
    scores = logits.float() / sampling.temperature  # [B, V]
    if sampling.top_p < 1:
        probs, order = scores.softmax(-1).sort(dim=-1, descending=True, stable=True)
        before = probs.cumsum(-1) - probs  # mass of the likelier ids: the nucleus is where it is still < top_p
        drop = torch.empty_like(order, dtype=torch.bool).scatter_(-1, order, before >= sampling.top_p)
        scores = scores.masked_fill(drop, float("-inf"))
    gumbel = -torch.log(-torch.log(uniforms(keys, step, scores.shape[-1])))
    return (scores + gumbel.float()).argmax(-1)
