"""The oracle every draft kind's unroll is checked against: serving-style drafting of every prefix with the draft's
own KV cache (one new key/value per drafted token, as an engine extends its cache)."""

import torch

from eagle_trainer import registry


def check_against_kv_cache(draft, ids: torch.Tensor, features: torch.Tensor, unrolled: list[torch.Tensor],
                           read=lambda draft, g: g) -> int:
    """Step k of `unrolled` at position t must equal `read(draft, g)`, g the output of drafting k+1 tokens after
    prefix t with the serving cache its registry entry names; fp64, 1e-9. Returns the number of (prefix, step) pairs checked."""
    b, t = ids.shape
    g0 = draft.project(features)
    checked = 0
    for prefix in range(t):
        cache = registry.algorithm_of(draft.config).cache_class(draft)
        pos = torch.arange(prefix + 1).expand(b, -1)
        tokens = torch.cat([ids[:, 1:prefix + 2], ids.new_zeros(b, 1)], 1)[:, :prefix + 1]  # x[1..prefix+1]
        g = cache.extend(tokens, g0[:, :prefix + 1], pos)[:, -1:]
        for k in range(len(unrolled)):
            if k > 0:
                nxt = prefix + 1 + k
                tok = ids[:, nxt:nxt + 1] if nxt < t else ids.new_zeros(b, 1)
                g = cache.extend(tok, g, torch.full((b, 1), prefix + k))
            torch.testing.assert_close(unrolled[k][:, prefix], read(draft, g)[:, 0], rtol=1e-9, atol=1e-9)
            checked += 1
    return checked
