"""Acceptance length measured by real speculative decoding over a set of prompts, and its report.

Prompts come from tokenised chat examples (everything before the last assistant turn's first trained token,
i.e. up to and including the assistant header) or from conversations rendered with the chat template.

    report = measure_acceptance(model, spec, draft, prompts, DecodeConfig(...), stop_ids)   # spec: TargetSpec
    report["accept_len"]        tokens committed per verifying target forward, over all rounds of all prompts
    report["per_prompt"]        the same per prompt
    report["histogram"]         {committed tokens in a round: number of rounds}

Under torch.distributed with several ranks, every rank calls measure_acceptance with the same prompts: rank r of W
decodes prompts r, r + W, ..., its target forwards kept in step with the other ranks' when the target is sharded
(targets.sharded.target_lock_step: a rank whose prompts are done idles in the collectives until all are), and the
per-prompt results are gathered, so every rank returns the report one process gives on the same prompts.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from eagle_trainer.data.chat import Conversation, template_messages
from eagle_trainer.evaluate.speculative import DecodeConfig, draft_cache, speculative_generate
from eagle_trainer.registry import TargetSpec
from eagle_trainer.targets.sharded import target_lock_step


def prompt_from_example(input_ids: list[int], loss_mask: list[bool]) -> list[int] | None:
    """The ids before the last run of trained tokens (the last assistant reply); None if nothing is trained."""
    ends = [i for i in range(len(loss_mask)) if loss_mask[i] and (i == 0 or not loss_mask[i - 1])]
    return list(input_ids[:ends[-1]]) if ends and ends[-1] > 0 else None


def prompts_from_dataset(dataset, num: int) -> list[list[int]]:
    """Up to `num` prompts from a tokenised dataset (columns input_ids, loss_mask), in order."""
    prompts = []
    for row in range(len(dataset)):
        if len(prompts) == num:
            break
        ex = dataset[row]
        prompt = prompt_from_example(ex["input_ids"], ex["loss_mask"])
        if prompt:
            prompts.append(prompt)
    return prompts


def prompts_from_conversations(tokenizer, conversations: list[Conversation], **template_kwargs) -> list[list[int]]:
    """Each conversation up to (not including) its last assistant turn, rendered for generation (its messages whole:
    reasoning, tool calls and tool messages reach the template)."""
    prompts = []
    for conv in conversations:
        last = max((i for i, m in enumerate(conv) if m["role"] == "assistant"), default=len(conv))
        history = template_messages(conv[:last])
        if not history:
            continue
        text = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True, **template_kwargs)
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return prompts


def _ranks() -> tuple[int, int]:
    """(rank, world size) of the process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def measure_acceptance(model, spec: TargetSpec, draft, prompts: list[list[int]], cfg: DecodeConfig,
                       stop_ids: tuple[int, ...] = (), progress: bool = False) -> dict:
    """Speculative decoding of every prompt with the target `model` (its registry entry `spec`); the
    acceptance-length report (module docstring). Under several ranks every rank calls it (module docstring)."""
    if not prompts:
        raise ValueError("no prompts to measure acceptance on: the eval data has no assistant turn to prompt with")
    was_training = draft.training
    draft.eval()
    rank, world = _ranks()
    start = time.perf_counter()
    done = {}  # prompt index -> (accept lengths, new tokens)
    mine = range(rank, len(prompts), world)
    dcache = draft_cache(draft, prompts, cfg)  # one for every prompt: its CUDA graphs are captured once
    with target_lock_step(model, spec):
        for i in tqdm(mine, desc=f"accept ({cfg.mode})", disable=not progress or rank != 0, leave=False):
            gen = speculative_generate(model, spec, draft, prompts[i], cfg, stop_ids, dcache)
            done[i] = (gen.accept_lengths, len(gen.tokens))
    if world > 1:  # outside the lock step: a gather is a collective of its own
        parts = [None] * world
        dist.all_gather_object(parts, done)
        done = {i: result for part in parts for i, result in part.items()}
    draft.train(was_training)
    rounds, per_prompt, tokens = Counter(), [], 0
    for i in range(len(prompts)):  # prompt order, whichever rank decoded it
        accept_lengths, new_tokens = done[i]
        rounds.update(accept_lengths)
        tokens += new_tokens
        if accept_lengths:
            per_prompt.append(sum(accept_lengths) / len(accept_lengths))
    num_rounds = sum(rounds.values())
    return {
        "mode": cfg.mode,
        "decode": asdict(cfg),
        "accept_len": sum(k * v for k, v in rounds.items()) / max(num_rounds, 1),
        "per_prompt": per_prompt,
        "histogram": {int(k): rounds[k] for k in sorted(rounds)},
        "num_prompts": len(prompts),
        "num_rounds": num_rounds,
        "new_tokens": tokens,
        "wall_s": time.perf_counter() - start,
    }


def plot_histogram(reports: list[dict], path: str | Path) -> Path:
    """Bar chart of tokens committed per round, one series per report (chain, tree)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / max(len(reports), 1)
    for i, rep in enumerate(reports):
        total = max(rep["num_rounds"], 1)
        keys = sorted(rep["histogram"])
        ax.bar([k + (i - (len(reports) - 1) / 2) * width for k in keys],
               [rep["histogram"][k] / total for k in keys], width=width,
               label=f"{rep['mode']}: tau {rep['accept_len']:.2f}")
    ax.set(xlabel="tokens committed per target forward", ylabel="fraction of rounds",
           title="acceptance length histogram")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
