"""`eagle-data regenerate` across ranks: a target sharded over them (FSDP2 + expert parallel) writes the file one
process writes; a resumed run writes the file an uninterrupted one writes, on any world size; sampling does not
depend on the world or the batch; bad inputs are refused before any weight is read.

Five conversations (one of two assistant turns, others prompt-only) in batches of 2: world 2 has rank 1 idle in
the last chunk, world 4 ranks 2 and 3 idle or half busy. The tiny targets are fp32 with HF's MoE loop on the CPU:
the sharded target's logits equal the whole one's to ~1e-6, far below the gaps greedy decoding sees (logit_std 6).
Each world size is one spawn of ranks that runs all its jobs in turn, in one process group.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch.distributed as dist

import eagle_trainer.app.regenerate as app_regenerate
from eagle_trainer.app.data import main
from eagle_trainer.app.regenerate import SIDECAR_SUFFIX, file_sha256
from eagle_trainer.targets.loading import target_fingerprint
from eagle_trainer.targets.tiny import save_tiny_checkpoint, tiny_qwen3_moe_config
from ranks import run_ranks

CONVERSATIONS = [
    [{"role": "user", "content": "Kalo mi ne su ta ri po?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Zu chi mo fa gle?"},
     {"role": "assistant", "content": "old answer"}, {"role": "user", "content": "Ve da?"},
     {"role": "assistant", "content": "another old answer"}],
    [{"role": "system", "content": "You are a tree."}, {"role": "user", "content": "Tell me about gle mo."}],
    [{"role": "user", "content": "Describe ri ta po."}, {"role": "assistant", "content": "old"}],
    [{"role": "user", "content": "What is su ne?"}],
]
SAMPLING = ["--temperature", "1.0", "--top-p", "0.9"]


def argv(target, data, out, *extra) -> list[str]:
    return ["regenerate", "--target", str(target), "--data", str(data), "--out", str(out), "--batch-size", "2",
            "--max-new-tokens", "8", "--device", "cpu", "--no-progress", *extra]


def torn_copy(src: Path, dst: Path, lines: int) -> Path:
    """What a run killed while writing line `lines` + 1 of `src` leaves: its first lines, half a line, the sidecar."""
    text = src.read_bytes().splitlines(keepends=True)
    dst.write_bytes(b"".join(text[:lines]) + text[lines][: len(text[lines]) // 2])
    shutil.copyfile(f"{src}{SIDECAR_SUFFIX}", f"{dst}{SIDECAR_SUFFIX}")
    return dst


def jobs_on_rank(rank: int, jobs: list[tuple[str, list[str]]], out_dir: str) -> None:
    """Every job in turn in one process group (each command finds the group up and leaves it); the ValueErrors,
    which every rank raises alike, are recorded by job name."""
    dist.init_process_group("gloo")
    errors = {}
    for name, job in jobs:
        try:
            main(job)
        except ValueError as e:
            errors[name] = str(e)
    (Path(out_dir) / f"errors_{rank}.json").write_text(json.dumps(errors))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def targets(tiny_qwen3_moe_path, tiny_qwen3_next_path, tmp_path_factory) -> dict[str, Path]:
    """The tiny MoE targets, and one of 3 experts whose weights file is garbage (reading it fails)."""
    odd = tmp_path_factory.mktemp("three_experts")
    save_tiny_checkpoint(odd, tiny_qwen3_moe_config(vocab_size=1024, num_layers=2, num_experts=3, top_k=2))
    (odd / "model.safetensors").write_bytes(b"not safetensors")
    return {"moe": tiny_qwen3_moe_path, "next": tiny_qwen3_next_path, "three_experts": odd}


@pytest.fixture(scope="module")
def one_process(targets, tmp_path_factory) -> Path:
    """The input and every one-process output the ranks are compared with."""
    root = tmp_path_factory.mktemp("regenerate_ranks")
    (root / "chat.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    for arch in ("moe", "next"):
        main(argv(targets[arch], root / "chat.jsonl", root / f"one_{arch}.jsonl"))
    for name, extra in {"b1": ["--batch-size", "1", "--seed", "5"], "b3": ["--batch-size", "3", "--seed", "5"],
                        "seed6": ["--seed", "6"]}.items():
        main(argv(targets["moe"], root / "chat.jsonl", root / f"sample_{name}.jsonl", *SAMPLING, *extra))
    return root


def run_world(world: int, root: Path, targets: dict[str, Path], out: Path) -> Path:
    sharded = ["parallel=fsdp_ep", "parallel.ep=2"]
    data = root / "chat.jsonl"
    resumed = torn_copy(root / "one_moe.jsonl", out / "resumed.jsonl", lines=1)
    jobs = [(arch, argv(targets[arch], data, out / f"{arch}.jsonl", *sharded)) for arch in ("moe", "next")]
    jobs.append(("resume", argv(targets["moe"], data, resumed, "--resume", *sharded)))
    if world == 2:
        jobs.append(("sample", argv(targets["moe"], data, out / "sample.jsonl", *SAMPLING, "--seed", "5", *sharded)))
        jobs.append(("three_experts", argv(targets["three_experts"], data, out / "x.jsonl", *sharded)))
    run_ranks(world, jobs_on_rank, jobs, str(out))
    return out


@pytest.fixture(scope="module")
def world2(one_process, targets, tmp_path_factory) -> Path:
    return run_world(2, one_process, targets, tmp_path_factory.mktemp("world2"))


@pytest.fixture(scope="module")
def world4(one_process, targets, tmp_path_factory) -> Path:
    return run_world(4, one_process, targets, tmp_path_factory.mktemp("world4"))


@pytest.mark.parametrize("world", ["world2", "world4"])
@pytest.mark.parametrize("arch", ["moe", "next"])
def test_sharded_greedy_equals_one_process(request, one_process, world, arch):
    out = request.getfixturevalue(world)
    assert (out / f"{arch}.jsonl").read_text() == (one_process / f"one_{arch}.jsonl").read_text()
    assert len((out / f"{arch}.jsonl").read_text().splitlines()) == len(CONVERSATIONS)
    # the sidecars record the same job: the world size is not part of it
    assert json.loads(Path(f"{out / arch}.jsonl{SIDECAR_SUFFIX}").read_text()) == json.loads(
        Path(f"{one_process / f'one_{arch}'}.jsonl{SIDECAR_SUFFIX}").read_text())


@pytest.mark.parametrize("world", ["world2", "world4"])
def test_resume_on_another_world_size_equals_the_uninterrupted_run(request, one_process, world):
    out = request.getfixturevalue(world)  # the cut file was written by one process; the ranks resumed it
    assert (out / "resumed.jsonl").read_text() == (one_process / "one_moe.jsonl").read_text()
    assert json.loads((out / "errors_0.json").read_text()).keys() <= {"three_experts"}


class Killed(Exception):
    pass


def test_resume_after_a_kill_equals_the_uninterrupted_run(one_process, targets, tmp_path, monkeypatch, capsys):
    data, out = one_process / "chat.jsonl", tmp_path / "out.jsonl"
    append = app_regenerate.ChatAppender.append
    chunks = []

    def killed_after_one_chunk(self, conversations):
        if chunks:
            raise Killed  # the job dies while regenerating its second chunk
        append(self, conversations)
        chunks.append(len(conversations))

    monkeypatch.setattr(app_regenerate.ChatAppender, "append", killed_after_one_chunk)
    with pytest.raises(Killed):
        main(argv(targets["moe"], data, out))
    monkeypatch.undo()
    with open(out, "ab") as f:
        f.write(b'{"messages": [{"role": "user", "con')  # and the kill tore the line it was writing
    assert chunks == [2]
    capsys.readouterr()
    main(argv(targets["moe"], data, out, "--resume"))
    said = capsys.readouterr().out
    assert "resuming" in said and "2 of 5 conversations done; dropped a torn last line of 35 bytes" in said
    assert "regenerated 3 conversations after the 2 already in" in said
    assert "on 1 rank(s), ep 1, target whole on each rank" in said
    assert out.read_text() == (one_process / "one_moe.jsonl").read_text()
    # a resume of a finished file regenerates nothing and changes nothing
    main(argv(targets["moe"], data, out, "--resume"))
    assert out.read_text() == (one_process / "one_moe.jsonl").read_text()


def test_sidecar_records_target_data_and_settings(one_process, targets):
    record = json.loads(Path(f"{one_process / 'one_moe.jsonl'}{SIDECAR_SUFFIX}").read_text())
    assert record["target"] == target_fingerprint(targets["moe"])
    assert record["data"] == file_sha256(one_process / "chat.jsonl")
    assert record["settings"] == {"max_new_tokens": 8, "temperature": 0.0, "top_p": 1.0, "seed": 0,
                                  "thinking": "keep", "on_error": "raise", "chat_template_kwargs": None,
                                  "chat_template": None, "dtype": "float32"}


def test_sampling_is_the_same_for_any_world_and_batch_and_differs_by_seed(one_process, world2):
    b1, b3 = (one_process / "sample_b1.jsonl").read_text(), (one_process / "sample_b3.jsonl").read_text()
    assert b1 == b3 == (world2 / "sample.jsonl").read_text()
    other = (one_process / "sample_seed6.jsonl").read_text()
    assert other != b1 and len(other.splitlines()) == len(CONVERSATIONS)
    assert b1 != (one_process / "one_moe.jsonl").read_text()  # not greedy


def test_ep_that_does_not_divide_the_experts_is_refused_before_the_weights_are_read(world2):
    for rank in range(2):  # every rank alike; reading the weights would have failed otherwise ("corrupt")
        errors = json.loads((world2 / f"errors_{rank}.json").read_text())
        assert errors.keys() == {"three_experts"}
        assert errors["three_experts"].startswith("parallel.ep=2 does not divide the target's 3 routed experts; "
                                                  "pick an ep that divides both")
    assert not (world2 / "x.jsonl").exists()


# Refusals on one process: each must come before the target's weights are read.

@pytest.fixture
def no_loading(monkeypatch):
    def open_target(*args, **kwargs):
        raise AssertionError("the target was loaded before the refusal")
    monkeypatch.setattr(app_regenerate, "open_target", open_target)


def test_ep_that_does_not_divide_the_world_is_refused(one_process, targets, tmp_path, no_loading):
    with pytest.raises(ValueError, match=r"parallel.ep=2 does not divide the world size 1; use a divisor"):
        main(argv(targets["moe"], one_process / "chat.jsonl", tmp_path / "o.jsonl", "parallel=fsdp_ep",
                  "parallel.ep=2"))
    assert not (tmp_path / "o.jsonl").exists()


def test_prompt_longer_than_the_context_is_refused(targets, tmp_path, no_loading):
    long = [{"role": "user", "content": " ".join(["kalo mi ne su"] * 400)}]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in [CONVERSATIONS[0], long]))
    with pytest.raises(ValueError, match=r"^conversation 1 of the input has a prompt of \d+ tokens, which reaches the "
                                         r"target's context of 1024 tokens .*; shorten that conversation or drop it"):
        main(argv(targets["moe"], tmp_path / "chat.jsonl", tmp_path / "o.jsonl"))


def test_existing_output_is_refused_without_resume_or_overwrite(one_process, targets, tmp_path, no_loading):
    out = tmp_path / "o.jsonl"
    out.write_text("")
    with pytest.raises(ValueError, match=r"--out .*o.jsonl already exists; pass --resume to continue it .* or "
                                         r"--overwrite to start it over"):
        main(argv(targets["moe"], one_process / "chat.jsonl", out))
    with pytest.raises(ValueError, match=r"--resume and --overwrite exclude each other"):
        main(argv(targets["moe"], one_process / "chat.jsonl", out, "--resume", "--overwrite"))
    with pytest.raises(ValueError, match=r"--resume: .*o.jsonl has no sidecar o.jsonl.regen.json.*--overwrite"):
        main(argv(targets["moe"], one_process / "chat.jsonl", out, "--resume"))


@pytest.mark.parametrize("change, message", [
    ("target", r"was regenerated by the target at .* \(fingerprint [0-9a-f]{12}\), but --target .* has fingerprint "
               r"[0-9a-f]{12} .*; resume with that target, or pass --overwrite"),
    ("settings", r"was regenerated with max_new_tokens=8, but this run has max_new_tokens=9; rerun with "
                 r"max_new_tokens=8 to continue it, or pass --overwrite"),
    ("sampling", r"was regenerated with temperature=0.0, but this run has temperature=0.7; rerun with "
                 r"temperature=0.0 to continue it"),
    ("data", r"was regenerated from .*chat.jsonl \(sha256 [0-9a-f]{12}\), but --data .*other.jsonl has sha256 "
             r"[0-9a-f]{12}; resume with the same input file, or pass --overwrite"),
])
def test_resume_of_another_job_is_refused(one_process, targets, tiny_qwen3_path, tmp_path, no_loading, change,
                                          message):
    out = torn_copy(one_process / "one_moe.jsonl", tmp_path / "o.jsonl", lines=2)
    data, target, extra = one_process / "chat.jsonl", targets["moe"], []
    if change == "target":
        target = tiny_qwen3_path
    elif change == "data":
        data = tmp_path / "other.jsonl"
        data.write_text((one_process / "chat.jsonl").read_text() + json.dumps({"messages": CONVERSATIONS[0]}) + "\n")
    else:
        extra = ["--temperature", "0.7"] if change == "sampling" else []
    a = argv(target, data, out, "--resume", *extra)
    if change == "settings":
        a[a.index("--max-new-tokens") + 1] = "9"
    before = out.read_bytes()
    with pytest.raises(ValueError, match=message):
        main(a)
    assert out.read_bytes() == before  # not even the torn line is dropped


def test_static_decode_writes_the_same_file(one_process, targets, tmp_path, capsys):
    main(argv(targets["moe"], one_process / "chat.jsonl", tmp_path / "o.jsonl", "--decode", "static"))
    assert (tmp_path / "o.jsonl").read_text() == (one_process / "one_moe.jsonl").read_text()
    assert "decode static" in capsys.readouterr().out


@pytest.mark.parametrize("arch, decode, message", [
    ("moe", "graph", r"--decode graph replays CUDA graphs of a whole target; this one is on cpu: use --decode eager"),
    ("next", "static", r"needs a target whose layers are all full attention, but this one has \['full_attention', "
                       r"'linear_attention'\]; use decode=eager"),
])
def test_decode_mode_the_target_cannot_run_is_refused(one_process, targets, tmp_path, no_loading, arch, decode,
                                                      message):
    with pytest.raises(ValueError, match=message):
        main(argv(targets[arch], one_process / "chat.jsonl", tmp_path / "o.jsonl", "--decode", decode))
