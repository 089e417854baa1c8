"""Speculative decoding with a frozen HF target and an EAGLE draft: chain and EAGLE-2 dynamic trees, greedy.

One sequence at a time, KV caches on both sides. With L tokens committed, the target's cache holds positions
0..L-2 and the last committed token is pending; the draft's cache holds positions 0..L-2 too, where the entry
at position t pairs the target's feature at t (EAGLE-3: aux hidden states; EAGLE-1/2: the final normed hidden
state) with token t+1, and its output g at L-2 predicts token L. The target's states are captured by the same
hooks as in training (targets.frozen.StateHooks, at the layers `draft.aux_layer_ids` and the final norm of the
target's registry entry); the draft says which feature it reads (`target_features`), and its algorithm's registry
entry names its KV cache (`cache_class`).

A round:
  1. draft a tree from g at L-2: depth 1 holds the top-k draft tokens; each later depth expands the top-k nodes
     of the previous one by cumulative log-probability (EAGLE-2); every generated node is a candidate, and the
     `total_tokens` best (each with its ancestors) form the tree. A chain is the tree with top-k 1.
  2. the target verifies [pending token] + tree in one forward (tree attention mask, positions by depth; the
     recurrent layers of a hybrid target advance each node's state from its parent's, spec.recurrent_states);
     walking down from the root, a child is accepted while its token equals the target's argmax at its parent.
  3. commit the accepted tokens plus the target's own next token (the bonus); keep their target KV entries (and
     the last accepted node's recurrent state); feed the draft their target features.
tau (acceptance length) = tokens committed per verifying target forward = accepted + 1, averaged over rounds.

Shapes: n new tokens of a forward, S cache length, Vd draft vocab, H draft hidden, Ht target hidden.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from typing import Callable

import torch

from eagle_trainer import registry
from eagle_trainer.data.regenerate import cache_argument
from eagle_trainer.drafts.llama import Draft, KVCache
from eagle_trainer.registry import TargetSpec
from eagle_trainer.targets.frozen import StateHooks
from eagle_trainer.types import CapturedStates


@dataclass(frozen=True)
class DecodeConfig:
    """How to draft: chain (top-1, `steps` deep) or tree (EAGLE-2: `topk`, `depth`, `total_tokens`)."""

    mode: str = "chain"  # chain | tree
    steps: int = 5  # chain: draft tokens per round
    topk: int = 8  # tree: children kept per expanded node, and nodes expanded per depth
    depth: int = 5  # tree: draft depth
    total_tokens: int = 31  # tree: draft tokens verified per round
    max_new_tokens: int = 128
    # tree: the target checks all draft tokens in one forward (tree attention mask; a recurrent layer advances one
    # state per node from its parent's), then keeps the accepted entries and the last accepted node's state.
    # walk: one forward per token along the greedy path with the target's own forward and cache, the reference;
    # the same tokens are accepted, so tau is the same, at more forwards.
    verify: str = "tree"

    def __post_init__(self):
        if self.mode not in ("chain", "tree"):
            raise ValueError(f"decode mode {self.mode!r} is not one of chain, tree")
        if self.verify not in ("tree", "walk"):
            raise ValueError(f"verify={self.verify!r} is not one of tree, walk")
        bad = {k: getattr(self, k) for k in ("steps", "topk", "depth", "total_tokens", "max_new_tokens")
               if getattr(self, k) < 1}
        if bad:
            raise ValueError(f"decoding options must be at least 1, got {bad}")

    def tree_shape(self) -> tuple[int, int, int]:
        """(topk, depth, total_tokens) actually used: a chain is a top-1 tree."""
        if self.mode == "chain":
            return 1, self.steps, self.steps
        return self.topk, self.depth, self.total_tokens


@dataclass
class Generation:
    tokens: list[int]  # new tokens, stop token included when one was produced
    accept_lengths: list[int] = field(default_factory=list)  # tokens committed by each verifying forward


class TargetCache:
    """The HF target with its KV cache: forward new tokens, keep only the committed entries afterwards.

    The target's states are captured as training captures them (targets.frozen.StateHooks on the aux layers and
    the final norm that `spec` names); `features(states)` turns them into the draft's input. `close()` removes
    the hooks."""

    def __init__(self, model, spec: TargetSpec, aux_layer_ids: tuple[int, ...],
                 features: Callable[[CapturedStates], torch.Tensor], verify: str = "tree"):
        from transformers import DynamicCache
        self.model = model
        self.hooks = StateHooks(model, spec, aux_layer_ids)
        self.features = features
        self.cache = DynamicCache(config=model.config)
        self.cache_name = cache_argument(model)  # the forward's name for it, read once
        self.length = 0
        self._last_rows = 0  # tokens the last forward fed
        # a target with recurrent layers keeps their states per tree node here (targets/gdn.py RecurrentStates);
        # walk verification runs the target's own forward and cache instead, as the reference
        self.recurrent = spec.recurrent_states(model) if spec.recurrent_states and verify == "tree" else None

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, tree: "Tree | None" = None,
                last_logits_only: bool = False):
        """ids, positions [n]; `tree` (None: the tokens continue the committed ones, causally): ids are its pending
        root then its nodes -> (logits [n or 1, V], features [n, F]).

        `last_logits_only` (the prefill): the LM head runs on the last position only, not on [n, V].
        """
        n = ids.shape[0]
        mask = None
        if tree is not None:  # a prepared 4D mask is used as is: [1, 1, n, S] additive
            allowed = torch.cat([torch.ones(n, self.length, dtype=torch.bool, device=ids.device),
                                 tree.ancestor_mask()], 1)
            dtype = self.model.dtype
            mask = torch.zeros(allowed.shape, dtype=dtype, device=ids.device)
            mask.masked_fill_(~allowed, torch.finfo(dtype).min)
            mask = mask[None, None]
        if self.recurrent is not None:
            # rows: the root continues the committed tokens (-1), node j's parent row is its parent's + 1
            self.recurrent.begin(None if tree is None else [-1] + [p + 1 for p in tree.parents])
            if mask is not None:
                mask = self.recurrent.attention_mask(mask)
        self.hooks.clear()
        out = self.model(input_ids=ids[None], position_ids=positions[None], attention_mask=mask,
                         **{self.cache_name: self.cache}, use_cache=True,
                         logits_to_keep=1 if last_logits_only else 0)
        self.length += n
        self._last_rows = n
        aux, final = self.hooks.take()  # [1, n, len(aux) * Ht], [1, n, Ht]
        # no teacher is formed here, so no argmax mask
        states = CapturedStates(aux_hidden=aux, final_hidden=final, argmax_valid=None)
        return out.logits[0], self.features(states)[0]

    def keep(self, rows: list[int], device: torch.device) -> None:
        """After a tree forward: keep the committed entries and those of its rows `rows` (ascending, root first: the
        accepted path), dropping the rest; recurrent layers take the last accepted row's state."""
        committed = self.length - self._last_rows
        index = torch.cat([torch.arange(committed, device=device),
                           torch.tensor([committed + r for r in rows], device=device)])
        for layer in self.cache.layers:
            if getattr(layer, "keys", None) is None:  # a layer without KV entries (recurrent: kept by self.recurrent)
                continue
            layer.keys = layer.keys.index_select(-2, index)
            layer.values = layer.values.index_select(-2, index)
        if self.recurrent is not None:
            self.recurrent.commit(rows)
        self.length = index.numel()

    def close(self) -> None:
        self.hooks.close()
        if self.recurrent is not None:
            self.recurrent.close()


@dataclass
class Tree:
    """Draft nodes in verification order (parents before children); the root (pending token) is implicit.
    The shape lives on the host (the decode loop reads it every round; a device copy would cost a sync each)."""

    tokens: torch.Tensor  # [N] target ids, on the model's device
    parents: list[int]  # [N] index into the nodes, -1 for a child of the root
    depths: list[int]  # [N] 1-based

    def ancestor_mask(self) -> torch.Tensor:
        """[N+1, N+1] bool with the root first: entry (i, j) says node j is i itself or one of its ancestors."""
        rows = [[True] + [False] * len(self.parents)]
        for i, parent in enumerate(self.parents):
            row = list(rows[parent + 1])
            row[i + 1] = True
            rows.append(row)
        return torch.tensor(rows, device=self.tokens.device)


@torch.no_grad()
def draft_tree(draft: Draft, cache: KVCache, g_root: torch.Tensor, position: int,
               topk: int, depth: int, total_tokens: int) -> Tree:
    """EAGLE-2 dynamic tree from g_root [H] (the draft output at `position`); the cache grows and is truncated back.

    Candidates: the top-k children of the root, then at each depth the top-k children of each of the top-k
    candidates of the previous depth (by cumulative log-probability). The final tree is the `total_tokens`
    best candidates, taken in score order and only once their parent is in.
    """
    committed = len(cache)
    device = g_root.device
    logp = torch.log_softmax(draft.logits(g_root[None, None]).float()[0, 0], -1)  # [Vd] (EAGLE-1: [V])
    scores, ids = logp.topk(min(topk, logp.numel()))
    cand_tok, cand_score = [ids], [scores]  # per depth: draft ids and cumulative log-probs
    parents, depths = [-1] * ids.numel(), [1] * ids.numel()  # host lists, one entry per candidate
    frontier = list(range(ids.numel()))  # candidate indices expanded next
    frontier_g = g_root[None].expand(ids.numel(), -1)  # hidden input of each frontier node: its parent's g
    slot: dict[int, int] = {}  # candidate -> its position in the draft cache
    for d in range(1, depth):
        all_tok, all_score = torch.cat(cand_tok), torch.cat(cand_score)
        n = len(frontier)
        for node in frontier:
            slot[node] = committed + len(slot)
        # each frontier node sees the committed cache, its fed ancestors and itself (built on the host, one copy)
        fed = []
        for node in frontier:
            row = [False] * len(slot)
            while node >= 0:
                row[slot[node] - committed] = True
                node = parents[node]
            fed.append(row)
        allowed = torch.cat([torch.ones(n, committed, dtype=torch.bool, device=device),
                             torch.tensor(fed, device=device)], 1)
        front = torch.tensor(frontier, device=device)
        tokens = draft.draft_to_target(all_tok[front])
        pos = torch.full((n,), position + d, device=device)
        g = cache.extend(tokens[None], frontier_g[None], pos[None], allowed)[0]  # [n, H]
        logp = torch.log_softmax(draft.logits(g[None]).float()[0], -1)  # [n, Vd]
        child_score, child_id = logp.topk(min(topk, logp.shape[-1]), dim=-1)  # [n, k]
        child_score = child_score + all_score[front, None]
        base, k = all_tok.numel(), child_id.shape[1]
        cand_tok.append(child_id.flatten())
        cand_score.append(child_score.flatten())
        parents += [p for p in frontier for _ in range(k)]
        depths += [d + 1] * (n * k)
        best = child_score.flatten().topk(min(topk, n * k)).indices
        frontier = [base + i for i in best.tolist()]
        frontier_g = g.repeat_interleave(k, 0)[best]
    cache.truncate(committed)

    tok, score = torch.cat(cand_tok), torch.cat(cand_score).tolist()
    order = sorted(range(len(score)), key=lambda i: (-score[i], depths[i], i))
    chosen: dict[int, int] = {}  # candidate index -> node index
    for i in order:
        if len(chosen) == total_tokens:
            break
        if parents[i] < 0 or parents[i] in chosen:
            chosen[i] = len(chosen)
    picked = sorted(chosen, key=lambda i: (depths[i], chosen[i]))  # parents before children
    index = {c: j for j, c in enumerate(picked)}
    sel = torch.tensor(picked, device=device)
    return Tree(tokens=draft.draft_to_target(tok[sel]),
                parents=[index[parents[c]] if parents[c] >= 0 else -1 for c in picked],
                depths=[depths[c] for c in picked])


def accept(tree: Tree, target_next: list[int], tokens: list[int]) -> list[int]:
    """Greedy walk: node indices accepted in order, given the target's argmax at [root] + nodes ([N+1]) and the
    nodes' tokens, both read to the host."""
    path, current = [], -1
    next_tok, parents = target_next, tree.parents
    while True:
        want = next_tok[current + 1]
        child = next((j for j in range(len(tokens)) if parents[j] == current and tokens[j] == want), None)
        if child is None:
            return path
        path.append(child)
        current = child


def walk_verify(target: TargetCache, tree: Tree, pending: int, committed: int):
    """Verify by feeding the target one token at a time along the greedy path: the pending token, then each
    child whose token is the target's argmax at its parent. The target's cache then holds exactly the
    committed tokens (no rollback needed). -> (path, new tokens incl. the bonus, features [len(path)+1, F])."""
    device = tree.tokens.device
    tokens, parents = tree.tokens.tolist(), tree.parents
    path, feats, token, current = [], [], pending, -1
    while True:
        logits, f = target.forward(torch.tensor([token], device=device),
                                   torch.tensor([committed + len(path)], device=device))
        feats.append(f)
        want = int(logits[-1].argmax())
        child = next((j for j in range(len(tokens)) if parents[j] == current and tokens[j] == want), None)
        if child is None:
            return path, [tokens[j] for j in path] + [want], torch.cat(feats)
        path.append(child)
        token, current = want, child


def draft_cache(draft: Draft, prompts: list[list[int]], cfg: DecodeConfig) -> KVCache:
    """One draft KV cache for decoding every one of `prompts` with `cfg` (pass it to each speculative_generate):
    preallocated for the longest, so that its step shapes repeat from prompt to prompt and, on a GPU, each is
    captured as a CUDA graph once (llama.KVCache)."""
    topk, depth, _ = cfg.tree_shape()
    # committed tokens overshoot max_new_tokens by at most a round (depth + 1); a round drafts topk * depth more
    capacity = max(map(len, prompts)) + cfg.max_new_tokens + (depth + 1) + topk * depth
    return registry.algorithm_of(draft.config).cache_class(draft, capacity=capacity)


@torch.no_grad()
def speculative_generate(model, spec: TargetSpec, draft: Draft, prompt: list[int], cfg: DecodeConfig,
                         stop_ids: tuple[int, ...] = (), dcache: KVCache | None = None) -> Generation:
    """Greedy speculative decoding of `prompt` (target ids) with the target `model` (its registry entry `spec`);
    the output equals plain greedy decoding. `dcache`: the draft's KV cache (`draft_cache`) reused from an
    earlier prompt; by default one for this prompt."""
    dcache = draft_cache(draft, [prompt], cfg) if dcache is None else dcache
    dcache.reset()
    target = TargetCache(model, spec, draft.aux_layer_ids, draft.target_features, cfg.verify)
    try:
        return _speculative_generate(target, draft, dcache, prompt, cfg, stop_ids)
    finally:
        target.close()


def _speculative_generate(target: TargetCache, draft: Draft, dcache: KVCache, prompt: list[int], cfg: DecodeConfig,
                          stop_ids: tuple[int, ...]) -> Generation:
    device = next(target.model.parameters()).device
    draft_dtype = draft.compute_dtype()  # not the first parameter's: the trainer holds the frozen embedding in bf16
    topk, depth, total = cfg.tree_shape()

    ids = torch.tensor(prompt, device=device)
    logits, feats = target.forward(ids, torch.arange(len(prompt), device=device), last_logits_only=True)
    pending = int(logits[-1].argmax())
    out = Generation(tokens=[pending])
    # draft prefill: position t gets (target feature at t, token t+1)
    tokens = torch.cat([ids[1:], ids.new_tensor([pending])])
    g = dcache.extend(tokens[None], draft.project(feats.to(draft_dtype))[None],
                      torch.arange(len(prompt), device=device)[None])[0, -1]
    committed = len(prompt)  # tokens in the target cache; the pending token sits at position `committed`
    while len(out.tokens) < cfg.max_new_tokens and pending not in stop_ids:
        tree = draft_tree(draft, dcache, g, committed - 1, topk, depth, total)
        if cfg.verify == "walk":
            path, new_tokens, feats = walk_verify(target, tree, pending, committed)
        else:
            verify_ids = torch.cat([ids.new_tensor([pending]), tree.tokens])
            positions = torch.tensor([committed] + [committed + d for d in tree.depths], device=device)
            logits, feats = target.forward(verify_ids, positions, tree)
            # one read to the host: the target's argmax at [root] + nodes, then the nodes' tokens
            read = torch.cat([logits.argmax(-1), tree.tokens]).tolist()
            target_next, tokens = read[:len(tree.parents) + 1], read[len(tree.parents) + 1:]
            path = accept(tree, target_next, tokens)
            last = path[-1] + 1 if path else 0
            new_tokens = [tokens[j] for j in path] + [target_next[last]]
            rows = [0] + [j + 1 for j in path]  # verify rows now committed
            target.keep(rows, device)
            feats = feats[torch.tensor(rows, device=device)]
        out.accept_lengths.append(len(new_tokens))
        dcache.truncate(committed)
        g = dcache.extend(torch.tensor(new_tokens, device=device)[None], draft.project(feats.to(draft_dtype))[None],
                          (committed + torch.arange(len(new_tokens), device=device))[None])[0, -1]
        committed += len(new_tokens)
        pending = new_tokens[-1]
        for t in new_tokens:
            out.tokens.append(t)
            if t in stop_ids or len(out.tokens) == cfg.max_new_tokens:
                break
        if out.tokens[-1] in stop_ids:  # a stop token inside the accepted run ends decoding there
            break
    return out


@torch.no_grad()
def greedy_generate(model, prompt: list[int], max_new_tokens: int, stop_ids: tuple[int, ...] = ()) -> list[int]:
    """Plain greedy decoding with the target alone (the reference speculative decoding must reproduce)."""
    from transformers import DynamicCache
    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    cache_name = cache_argument(model)
    ids = torch.tensor(prompt, device=device)[None]
    tokens = []
    while len(tokens) < max_new_tokens:
        logits = model(input_ids=ids, **{cache_name: cache}, use_cache=True, logits_to_keep=1).logits
        tokens.append(int(logits[0, -1].argmax()))
        if tokens[-1] in stop_ids:
            break
        ids = ids.new_tensor([[tokens[-1]]])
    return tokens
