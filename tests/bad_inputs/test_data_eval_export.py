"""Bad inputs to data loading, target loading, `eagle-eval` and the export writers: each is refused with one line
naming the value and the fix, or counted; nothing is dropped or deleted silently."""

import json
import os
import shutil

import pytest
import torch

from eagle_trainer import registry
from eagle_trainer.app.evaluate import main as eagle_eval
from eagle_trainer.config import DataConfig, DraftConfig, TargetConfig
from eagle_trainer.data import build_dataset
from eagle_trainer.data.chat import read_chat_jsonl
from eagle_trainer.drafts.io import save_draft
from eagle_trainer.evaluate.simulated import simulated_on
from eagle_trainer.export import export_eagle1_sglang, export_sglang, export_vllm
from eagle_trainer.targets.loading import load_target, read_target_tensors, target_fingerprint
from eagle_trainer.targets.sharded import CheckpointReader
from test_registry import write_chat

CPU = torch.device("cpu")


def tiny_draft_checkpoint(target_path, directory, algorithm="eagle3", extra=None):
    """An untrained draft shaped for the target at `target_path`, saved as a trainer checkpoint in `directory`."""
    _, _, spec, info = load_target(TargetConfig(path=str(target_path)), CPU)
    draft_spec = registry.resolve(info.architecture, algorithm)
    aux = spec.aux_layers(info.num_layers) if draft_spec.algorithm.needs_aux_hidden else ()
    torch.manual_seed(0)
    draft = draft_spec.algorithm.build_draft(info, DraftConfig(algorithm=algorithm, draft_vocab_size=256), aux)
    ids = torch.arange(256) * 4  # target id of each draft id, ascending
    t2d = torch.zeros(info.vocab_size, dtype=torch.bool)
    t2d[ids] = True
    draft.set_vocab_map(ids - torch.arange(256), t2d)
    draft.config.extra.update(extra or {})
    save_draft(directory, draft)
    return draft


def copy_target(tiny_qwen3_path, directory):
    shutil.copytree(tiny_qwen3_path, directory)
    return directory


# 1. the simulated acceptance length counts every row, the ragged last batch and a data set under one batch too

@pytest.mark.parametrize("num_rows", [3, 6])
def test_simulated_acceptance_counts_every_row(tiny_qwen3_path, tmp_path, num_rows):
    model, tokenizer, _, info = load_target(TargetConfig(path=str(tiny_qwen3_path)), CPU)
    draft = tiny_draft_checkpoint(tiny_qwen3_path, tmp_path / "ckpt")
    draft.set_target_weights(model.get_input_embeddings().weight, model.get_output_embeddings().weight)
    data = write_chat(tmp_path / "chat.jsonl", n=num_rows)
    dataset, _ = build_dataset(DataConfig(path=str(data), max_length=256), tokenizer, tmp_path / "cache")
    assert len(dataset) == num_rows
    whole = simulated_on(model, info.architecture, draft, dataset, 3, 4, 0, CPU)
    rows = [simulated_on(model, info.architecture, draft, dataset.select([i]), 3, 1, 0, CPU)
            for i in range(num_rows)]
    expected = [sum(r["num_tokens"][k] for r in rows) for k in range(3)]
    assert whole["num_tokens"] == expected and expected[0] > 0
    hits = [sum(r["acc"][k] * r["num_tokens"][k] for r in rows) for k in range(3)]
    assert whole["acc"] == pytest.approx([h / n for h, n in zip(hits, expected)], abs=1e-6)


# 2. out-of-range eval options

@pytest.mark.parametrize("option", ["--num-prompts", "--max-new-tokens", "--ttt-steps", "--max-length", "--steps"])
def test_eval_refuses_out_of_range_options(tiny_qwen3_path, tmp_path, option):
    tiny_draft_checkpoint(tiny_qwen3_path, tmp_path / "ckpt")
    data = write_chat(tmp_path / "chat.jsonl", n=2)
    with pytest.raises(ValueError, match=f"{option}=0 .*at least"):
        eagle_eval(["--target", str(tiny_qwen3_path), "--draft", str(tmp_path / "ckpt"), "--data", str(data),
                    "--out", str(tmp_path / "eval.json"), "--mode", "chain", "--max-new-tokens", "4",
                    "--no-progress", option, "0"])
    assert not (tmp_path / "eval.json").exists()


# 3. invalid UTF-8 names file:line, or is skipped and counted

def test_invalid_utf8_names_file_and_line(tmp_path):
    data = write_chat(tmp_path / "chat.jsonl", n=3)
    lines = data.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b"Kalo", b"Ka\xff\xfelo")
    data.write_bytes(b"".join(lines))
    with pytest.raises(ValueError, match=rf"{data}:2: .*UTF-8.*on_error=skip"):
        read_chat_jsonl(data)
    conversations, skipped = read_chat_jsonl(data, on_error="skip")
    assert len(conversations) == 2 and skipped == {"bad_utf8": 1}


# 4. an empty data file says so

@pytest.mark.parametrize("content", [b"", b"\n  \n\t\n"])
def test_empty_data_file_says_it_is_empty(tiny_qwen3_path, tmp_path, content):
    data = tmp_path / "empty.jsonl"
    data.write_bytes(content)
    _, tokenizer, _, _ = load_target(TargetConfig(path=str(tiny_qwen3_path)), CPU)
    with pytest.raises(ValueError, match=rf"{data} is empty"):
        build_dataset(DataConfig(path=str(data)), tokenizer, tmp_path / "cache")
    with pytest.raises(ValueError, match=rf"{data} is empty"):
        read_chat_jsonl(data, on_error="skip")


# 5. a target without tokenizer files is refused at load

def test_target_without_tokenizer_files_is_refused(tiny_qwen3_path, tmp_path):
    target = copy_target(tiny_qwen3_path, tmp_path / "target")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (target / name).unlink()
    with pytest.raises(ValueError, match=rf"{target}'? has no tokenizer.*tokenizer\.json.*tokenizer_config\.json"):
        load_target(TargetConfig(path=str(target)), CPU)


# 6. a truncated or foreign .safetensors file is named

@pytest.mark.parametrize("damage", ["truncated", "not_safetensors"])
def test_corrupt_safetensors_is_named(tiny_qwen3_path, tmp_path, damage):
    target = copy_target(tiny_qwen3_path, tmp_path / "target")
    weights = target / "model.safetensors"
    content = weights.read_bytes()
    weights.write_bytes(content[: len(content) // 2] if damage == "truncated" else b"PK\x03\x04 a zip file")
    match = rf"{weights} is corrupt or truncated"
    with pytest.raises(ValueError, match=match):
        load_target(TargetConfig(path=str(target)), CPU)
    with pytest.raises(ValueError, match=match):
        read_target_tensors(target, ["model.embed_tokens.weight"])
    (target / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.embed_tokens.weight": "model.safetensors"}}))
    with CheckpointReader(target) as reader, pytest.raises(ValueError, match=match):
        reader.tensor("model.embed_tokens.weight")


# 7. --overwrite never deletes the checkpoint being exported

@pytest.mark.parametrize("out", ["run", "checkpoint", "checkpoints", "parent"])
def test_export_never_overwrites_its_own_checkpoint(tiny_qwen3_path, tmp_path, out):
    run = tmp_path / "runs" / "run"
    checkpoint = run / "checkpoints" / "step_10"
    tiny_draft_checkpoint(tiny_qwen3_path, checkpoint)
    out_dir = {"run": run, "checkpoint": checkpoint, "checkpoints": checkpoint.parent, "parent": tmp_path}[out]
    for export in (export_sglang, export_vllm):
        with pytest.raises(ValueError, match=rf"--out {out_dir} .*checkpoint {checkpoint}"):
            export(checkpoint, out_dir, overwrite=True)
    assert (checkpoint / "draft.safetensors").is_file()


def test_eagle1_export_never_overwrites_its_own_checkpoint(tiny_qwen3_path, tmp_path):
    checkpoint = tmp_path / "run" / "checkpoints" / "step_1"
    tiny_draft_checkpoint(tiny_qwen3_path, checkpoint, algorithm="eagle1")
    with pytest.raises(ValueError, match=rf"--out {tmp_path / 'run'} .*checkpoint {checkpoint}"):
        export_eagle1_sglang(checkpoint, tmp_path / "run", overwrite=True)
    assert (checkpoint / "draft.safetensors").is_file()


# 8. exports honour the umask

def test_export_honours_the_umask(tiny_qwen3_path, tmp_path):
    tiny_draft_checkpoint(tiny_qwen3_path, tmp_path / "ckpt")
    old = os.umask(0o022)
    try:
        out = export_sglang(tmp_path / "ckpt", tmp_path / "out")
        export_sglang(tmp_path / "ckpt", out, overwrite=True)
    finally:
        os.umask(old)
    assert oct(out.stat().st_mode & 0o777) == oct(0o755)
    for f in out.iterdir():
        assert oct(f.stat().st_mode & 0o777) == oct(0o644), f.name


# 9. the export records its target; eagle-eval refuses another target

def test_export_records_the_target_fingerprint(tiny_qwen3_path, tmp_path):
    from eagle_trainer.export import target_fingerprint_of

    fingerprint = target_fingerprint(tiny_qwen3_path)
    draft = tiny_draft_checkpoint(tiny_qwen3_path, tmp_path / "ckpt", extra={"target_fingerprint": fingerprint})
    for export in (export_sglang, export_vllm):
        out = export(tmp_path / "ckpt", tmp_path / export.__name__)
        target = json.loads((out / "config.json").read_text())["eagle_trainer"]["target"]
        assert target == {"fingerprint": fingerprint, "vocab_size": 1024,
                          "aux_layer_ids": list(draft.config.aux_layer_ids)}
        assert target_fingerprint_of(out) == fingerprint
    assert target_fingerprint_of(tmp_path / "ckpt") == fingerprint
    tiny_draft_checkpoint(tiny_qwen3_path, tmp_path / "old")
    assert target_fingerprint_of(tmp_path / "old") is None


def eval_args(target, draft, tmp_path):
    data = write_chat(tmp_path / "chat.jsonl", n=2)
    return ["--target", str(target), "--draft", str(draft), "--data", str(data), "--out", str(tmp_path / "eval.json"),
            "--mode", "chain", "--num-prompts", "1", "--max-new-tokens", "2", "--ttt-steps", "2", "--no-progress"]


def test_eval_refuses_another_target(tiny_qwen3_path, tmp_path):
    other = copy_target(tiny_qwen3_path, tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))  # same shapes, not the same
    recorded, given = target_fingerprint(other), target_fingerprint(tiny_qwen3_path)
    tiny_draft_checkpoint(tiny_qwen3_path, tmp_path / "ckpt", extra={"target_fingerprint": recorded})
    with pytest.raises(ValueError, match=rf"draft {tmp_path / 'ckpt'} was trained on a target with fingerprint "
                                         rf"{recorded[:12]}.*--target {tiny_qwen3_path} has {given[:12]}"):
        eagle_eval(eval_args(tiny_qwen3_path, tmp_path / "ckpt", tmp_path))


def test_eval_measures_another_target_when_asked(tiny_qwen3_path, tmp_path, capsys):
    """--any-target turns the refusal into a warning (the same model re-saved in another dtype has another
    fingerprint)."""
    other = copy_target(tiny_qwen3_path, tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    tiny_draft_checkpoint(tiny_qwen3_path, tmp_path / "ckpt", extra={"target_fingerprint": target_fingerprint(other)})
    assert eagle_eval([*eval_args(tiny_qwen3_path, tmp_path / "ckpt", tmp_path), "--any-target"]) == 0
    assert "measuring anyway (--any-target)" in capsys.readouterr().err


def test_eval_warns_when_the_draft_records_no_target(tiny_qwen3_path, tmp_path, capsys):
    tiny_draft_checkpoint(tiny_qwen3_path, tmp_path / "ckpt")
    assert eagle_eval(eval_args(tiny_qwen3_path, tmp_path / "ckpt", tmp_path)) == 0
    assert f"draft {tmp_path / 'ckpt'} records no target fingerprint" in capsys.readouterr().err


def test_eval_renders_prompts_with_training_template_options(tiny_qwen3_path, tmp_path):
    """eagle-eval takes training's template keys: a keyword the template never reads is refused, naming it."""
    tiny_draft_checkpoint(tiny_qwen3_path, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="no_such_flag"):
        eagle_eval([*eval_args(tiny_qwen3_path, tmp_path / "ckpt", tmp_path),
                    "--chat-template-kwargs", '{"no_such_flag": true}'])
    with pytest.raises(ValueError, match="--chat-template-kwargs"):
        eagle_eval([*eval_args(tiny_qwen3_path, tmp_path / "ckpt", tmp_path), "--chat-template-kwargs", "[1]"])
