"""`eagle-data synthesize`: the file does not depend on the batch size or the world size (two ranks sharing a
sharded target) and a seed writes its own prompts; its output feeds regenerate, whose output feeds vocab; a resumed
run (after a torn line, or asked for more prompts) writes the file an uninterrupted one writes; a cap reached first
warns with the counts; a checkpoint without a chat template is refused before any weight is read."""

import json
import shutil
from pathlib import Path

import pytest
import torch.distributed as dist

from eagle_trainer.app.data import main
from eagle_trainer.app.synthesize import SIDECAR_SUFFIX
from eagle_trainer.data.chat import read_chat_jsonl
from ranks import run_ranks


def argv(target, out, *extra, num_prompts: int = 8) -> list[str]:
    return ["synthesize", "--target", str(target), "--out", str(out), "--num-prompts", str(num_prompts),
            "--max-new-tokens", "24", "--device", "cpu", "--no-progress", *extra]


@pytest.fixture(scope="module")
def first_run(tiny_chat_target_path, tmp_path_factory) -> Path:
    """Eight prompts of seed 0 in batches of 3."""
    out = tmp_path_factory.mktemp("synthesize") / "prompts.jsonl"
    main(argv(tiny_chat_target_path, out, "--batch-size", "3"))
    return out


def test_the_file_does_not_depend_on_the_batch_size(tiny_chat_target_path, first_run, tmp_path):
    main(argv(tiny_chat_target_path, tmp_path / "one.jsonl", "--batch-size", "1"))
    assert (tmp_path / "one.jsonl").read_bytes() == first_run.read_bytes()
    main(argv(tiny_chat_target_path, tmp_path / "seed1.jsonl", "--batch-size", "3", "--seed", "1"))
    assert (tmp_path / "seed1.jsonl").read_bytes() != first_run.read_bytes()
    records = [json.loads(line) for line in first_run.read_text().splitlines()]
    conversations, _ = read_chat_jsonl(first_run, require_assistant=False)
    assert [len(c) for c in conversations] == [1] * 8 and all(c[0]["role"] == "user" for c in conversations)
    attempts = [r["attempt"] for r in records]
    assert attempts == sorted(set(attempts))
    sidecar = json.loads(Path(f"{first_run}{SIDECAR_SUFFIX}").read_text())
    assert sidecar["settings"]["prefix"] == "<|im_start|>user\n" and sidecar["settings"]["top_p"] == 0.99
    summary = sidecar["summary"]
    assert summary["kept"] == 8 and summary["attempts"] == attempts[-1] + 1 == 8 + sum(summary["dropped"].values())


def torn_copy(src: Path, dst: Path, lines: int) -> Path:
    """What a run killed while writing line `lines` + 1 of `src` leaves: its first lines, a part of the next, the
    sidecar."""
    text = src.read_bytes().splitlines(keepends=True)
    dst.write_bytes(b"".join(text[:lines]) + text[lines][:10])
    shutil.copyfile(f"{src}{SIDECAR_SUFFIX}", f"{dst}{SIDECAR_SUFFIX}")
    return dst


def jobs_on_rank(rank: int, jobs: list[list[str]]) -> None:
    """Every job in turn in one process group (each command finds the group up and leaves it)."""
    dist.init_process_group("gloo")
    for job in jobs:
        main(job)
    dist.destroy_process_group()


def test_two_ranks_sharing_a_sharded_target_write_the_file_one_process_writes(tiny_chat_target_path, first_run,
                                                                              tmp_path):
    """Batches of 2 per rank: each chunk draws 4 attempts, the last one past the 8th prompt; a resume on two ranks
    of a file one process cut."""
    resumed = torn_copy(first_run, tmp_path / "resumed.jsonl", lines=5)
    jobs = [argv(tiny_chat_target_path, tmp_path / "sharded.jsonl", "--batch-size", "2", "parallel=fsdp"),
            argv(tiny_chat_target_path, resumed, "--resume", "parallel=fsdp")]
    run_ranks(2, jobs_on_rank, jobs)
    assert (tmp_path / "sharded.jsonl").read_bytes() == resumed.read_bytes() == first_run.read_bytes()
    summary = json.loads(Path(f"{tmp_path / 'sharded.jsonl'}{SIDECAR_SUFFIX}").read_text())["summary"]
    assert summary["world_size"] == 2 and summary["sharded"]


def test_prompts_feed_regenerate_then_vocab(tiny_chat_target_path, first_run, tmp_path):
    chat = tmp_path / "chat.jsonl"
    main(["regenerate", "--data", str(first_run), "--target", str(tiny_chat_target_path), "--out", str(chat),
          "--max-new-tokens", "16", "--device", "cpu", "--no-progress"])
    conversations, _ = read_chat_jsonl(chat)
    prompts, _ = read_chat_jsonl(first_run, require_assistant=False)
    assert [c[0] for c in conversations] == [p[0] for p in prompts]
    assert all(c[1]["role"] == "assistant" for c in conversations)
    summary = main(["vocab", "--tokenizer", str(tiny_chat_target_path), "--data", str(chat), "--draft-vocab-size",
                    "64", "--out", str(tmp_path / "vocab.safetensors")])
    assert summary == 0 and (tmp_path / "vocab.safetensors").is_file()


def test_resume_after_a_torn_line_and_for_more_prompts(tiny_chat_target_path, first_run, tmp_path):
    out = torn_copy(first_run, tmp_path / "prompts.jsonl", lines=3)
    with pytest.raises(ValueError, match=r"already exists; pass --resume"):
        main(argv(tiny_chat_target_path, out))
    with pytest.raises(ValueError, match=r"was written with seed=0, but this run has seed=2"):
        main(argv(tiny_chat_target_path, out, "--resume", "--seed", "2"))
    main(argv(tiny_chat_target_path, out, "--resume", "--batch-size", "2"))
    assert out.read_bytes() == first_run.read_bytes()
    main(argv(tiny_chat_target_path, out, "--resume", num_prompts=12))
    fresh = tmp_path / "twelve.jsonl"
    main(argv(tiny_chat_target_path, fresh, "--batch-size", "5", num_prompts=12))
    assert out.read_bytes() == fresh.read_bytes() and len(fresh.read_text().splitlines()) == 12


def test_a_cap_reached_first_warns_with_the_counts(tiny_chat_target_path, tmp_path, capsys):
    main(argv(tiny_chat_target_path, tmp_path / "few.jsonl", "--max-attempts", "3"))
    err = capsys.readouterr().err
    kept = len((tmp_path / "few.jsonl").read_text().splitlines())
    assert kept < 8 and f"warning: --max-attempts 3 reached with {kept} of 8 prompts kept" in err


def test_no_chat_template_is_refused_before_the_weights(tiny_chat_target_path, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_chat_target_path, base)
    (base / "chat_template.jinja").unlink()
    (base / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=r"the tokenizer has no chat template \(a base model\?\).*pass --prefix TEXT"):
        main(argv(base, tmp_path / "out.jsonl"))
    assert not (tmp_path / "out.jsonl").exists()
