"""`eagle-data synthesize` as a job: user prompts written by a target that may be sharded over ranks
(data/synthesize.py), kept in attempt order, resumable after a kill.

    chunks     attempts in chunks of world_size * batch_size; rank r draws attempts [r * batch_size, (r + 1) *
               batch_size) of each chunk inside target_lock_step (its forwards are collectives of a sharded
               target); then, outside the lock step, rank 0 gathers the chunk's samples, runs the clean-up over them
               in attempt order and tells every rank whether to go on
    output     rank 0 appends each chunk's kept prompts to --out (flushed and fsynced), one chat JSONL record per
               line: one user turn and the attempt it came from. The job ends when --num-prompts are kept, or warns
               with the counts when --max-attempts samples are drawn first
    sidecar    <out>.synth.json, written before the first line: the target's fingerprint and the settings the lines
               depend on (prefix, stop ids, sampling, clean-up, dtype); the run's summary is added at the end
    --resume   the sidecar must match this run; a torn last line is dropped, the clean-up relearns the kept prompts
               and the job goes on after the last one's attempt. --num-prompts and --max-attempts may differ: more
               prompts extend the file as a fresh run for that many would write it
    refusals   a chat template with no user turn (without --prefix / --stop-token), a stop token the tokenizer does
               not know, an existing --out without --resume or --overwrite, a resume against another target or other
               settings, an ep that divides neither the world nor the experts: all before the target's weights are
               read, on every rank alike

Attempt i is sampled with its own counters (data/sampling.py), so the file does not depend on the world size, the
batch size or where a resume cut it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from eagle_trainer.app import runtime
from eagle_trainer.app.regenerate import (agreed, check_decode, gather_to_rank_zero, open_output, read_target_side,
                                         write_sidecar)
from eagle_trainer.config import ParallelConfig, TargetConfig
from eagle_trainer.data.regenerate import context_length
from eagle_trainer.data.synthesize import (DROP_REASONS, PromptFilter, Synthesis, encode_prefix, prompt_record,
                                           sample_user_turns, stop_ids, take, user_turn)
from eagle_trainer.parallel import check_experts, init_parallel
from eagle_trainer.targets.loading import resolve_dtype, target_fingerprint
from eagle_trainer.targets.sharded import open_target, target_lock_step

SIDECAR_SUFFIX = ".synth.json"


@dataclass(frozen=True)
class SynthesizeJob:
    """What `eagle-data synthesize` was asked for."""

    target: TargetConfig
    out: str
    synthesis: Synthesis
    prefix: str | None = None  # None: the chat template's user-turn prefix
    stop_tokens: tuple[str, ...] = ()  # (): the chat template's end-of-turn token
    chat_template_kwargs: dict | None = None
    chat_template: str | None = None  # a jinja file to render with instead of the tokenizer's chat template
    batch_size: int = 32  # attempts per rank per chunk
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    decode: str = "auto"  # auto | eager | static | graph (app/regenerate.py check_decode)


def sidecar_path(out: str | Path) -> Path:
    return Path(f"{out}{SIDECAR_SUFFIX}")


def job_record(job: SynthesizeJob, prefix: str, stop: list[int], device: torch.device) -> dict:
    """What the lines depend on: the sidecar's contents (target_path is for people; the rest is compared)."""
    s = job.synthesis
    settings = {**asdict(s.sampling), "prefix": prefix, "stop_ids": stop, "min_chars": s.min_chars,
                "dedup_jaccard": s.dedup_jaccard, "ngram": s.ngram,
                "dtype": str(resolve_dtype(job.target.dtype, device)).removeprefix("torch.")}
    return {"target": target_fingerprint(job.target.path), "settings": settings, "target_path": str(job.target.path)}


def relearn(out: Path, kept_by: PromptFilter) -> int:
    """Offer the prompts already in `out` to the clean-up again (each must be kept): -> the attempt to go on at."""
    next_attempt = 0
    with open(out, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            try:
                record = json.loads(line)
                prompt, attempt = record["messages"][0]["content"], record["attempt"]
            except (json.JSONDecodeError, KeyError, IndexError, TypeError):
                prompt, attempt = None, -1
            if prompt is None or attempt < next_attempt or kept_by.offer(prompt) is not None:
                raise ValueError(f"--resume: {out}:{line_no} is not a prompt this job would have kept there (edited "
                                 f"by hand?); pass --overwrite to start {out} over")
            next_attempt = attempt + 1
    return next_attempt


def prepare_output(job: SynthesizeJob, record: dict, kept_by: PromptFilter) -> int:
    """Rank 0, before the target loads: check or start --out and its sidecar (app/regenerate.py open_output), then
    offer the prompts already there to `kept_by`. -> the attempt to go on at."""
    out = Path(job.out)
    resumed = open_output(out, sidecar_path(out), job.resume, job.overwrite, record, "prompt", written="written")
    if resumed is not None:
        start = relearn(out, kept_by)
        torn = resumed[1]
        print(f"resuming {out}: {len(kept_by.kept)} prompts kept, going on at attempt {start}"
              + (f"; dropped a torn last line of {torn} bytes" if torn else ""))
        return start
    return 0


def synthesize_file(job: SynthesizeJob, pcfg: ParallelConfig, device: torch.device) -> dict:
    """The whole job (module docstring) on this rank; -> the run's summary (rank 0 also prints it)."""
    hf_config, info, tokenizer = read_target_side(job)
    turn = user_turn(tokenizer, prefix=job.prefix, stop_tokens=job.stop_tokens,
                     chat_template_kwargs=job.chat_template_kwargs)
    stop = stop_ids(tokenizer, turn.stop_tokens)
    prefix_ids = encode_prefix(tokenizer, turn.prefix, context_length(hf_config))
    s = job.synthesis
    kept_by = PromptFilter(s.min_chars, s.dedup_jaccard, s.ngram)  # rank 0's decides
    with runtime.process_group(device, pcfg.backend):
        dims = init_parallel(pcfg, device)  # an ep that does not divide the world is refused here
        check_experts(dims.ep, info.num_experts)
        mode = check_decode(job.decode, device, dims.distributed and dims.target == "fsdp", hf_config)
        start = agreed(lambda: prepare_output(job, job_record(job, turn.prefix, stop, device), kept_by), dims)
        opened = open_target(job.target, device, dims, progress=job.progress and dims.rank == 0)
        summary = _run_chunks(job, opened, kept_by, prefix_ids, stop, start, mode)
    summary.update(prefix=turn.prefix, stop_tokens=list(turn.stop_tokens), stop_ids=stop)
    if dims.rank == 0:
        record = json.loads(sidecar_path(job.out).read_text())
        write_sidecar(sidecar_path(job.out), {**record, "summary": summary})
        dropped = ", ".join(f"{r} {n}" for r, n in summary["dropped"].items() if n) or "none"
        print(f"kept {summary['new']} prompts of {summary['attempts']} drawn"
              + (f" (after the {summary['kept'] - summary['new']} already in {job.out})" if start else "")
              + f"; dropped {dropped}; {summary['new_tokens']} new tokens, {summary['tokens_per_s']:.1f} tokens/s, on "
              f"{summary['world_size']} rank(s), ep {summary['ep']}, target "
              f"{'sharded' if summary['sharded'] else 'whole on each rank'}, decode {mode}; wrote {job.out}")
        if summary["kept"] < s.num_prompts:
            print(f"warning: --max-attempts {s.attempt_cap} reached with {summary['kept']} of {s.num_prompts} prompts "
                  f"kept (dropped {dropped}); raise --max-attempts and --resume, or loosen the clean-up "
                  "(--min-chars, --dedup-jaccard; --max-new-tokens when many are truncated)", file=sys.stderr)
    return summary


def _run_chunks(job: SynthesizeJob, opened, kept_by: PromptFilter, prefix_ids: list[int], stop: list[int],
                start: int, mode: str) -> dict:
    """Draw attempts from `start` chunk by chunk until enough are kept or the cap; rank 0 appends each chunk's kept
    prompts to job.out."""
    dims, size, s = opened.dims, job.batch_size, job.synthesis
    num, cap = s.num_prompts, s.attempt_cap
    writer = open(job.out, "ab") if dims.rank == 0 else None
    before = len(kept_by.kept)
    bar = tqdm(total=num, initial=min(before, num), desc="synthesize", unit="prompt", dynamic_ncols=True,
               disable=not (job.progress and dims.rank == 0))
    attempt, drawn_to, new_tokens, began = start, start, 0, time.perf_counter()
    try:
        while agreed(lambda: len(kept_by.kept) < num, dims) and attempt < cap:  # rank 0's filter decides
            end = min(attempt + dims.world_size * size, cap)
            first = min(attempt + dims.rank * size, end)
            mine = list(range(first, min(first + size, end)))
            with target_lock_step(opened.model, opened.spec):
                samples = [] if not mine else sample_user_turns(opened.model, opened.tokenizer, prefix_ids, mine,
                                                                s.sampling, stop, mode)
            parts = gather_to_rank_zero(samples, dims)
            if writer is not None:
                chunk = [sample for part in parts for sample in part]
                kept, used = take(kept_by, chunk, num)
                writer.write("".join(json.dumps(prompt_record(p, a), ensure_ascii=False) + "\n"
                                     for a, p in kept).encode("utf-8"))
                writer.flush()
                os.fsync(writer.fileno())
                drawn_to = attempt + used
                new_tokens += sum(sample.num_tokens for sample in chunk)
                bar.set_postfix_str(f"{new_tokens / (time.perf_counter() - began):.0f} tok/s, {drawn_to} drawn",
                                    refresh=False)
                bar.update(len(kept))
            attempt = end
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    seconds = time.perf_counter() - began
    return {"kept": len(kept_by.kept), "new": len(kept_by.kept) - before, "num_prompts": num,
            "attempts": drawn_to - start, "resumed_at": start, "max_attempts": cap,
            "dropped": {r: kept_by.dropped[r] for r in DROP_REASONS}, "new_tokens": new_tokens, "seconds": seconds,
            "tokens_per_s": new_tokens / seconds if seconds > 0 else 0.0, "decode": mode, **opened.how_it_ran()}
