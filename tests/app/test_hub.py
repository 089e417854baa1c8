"""Hugging Face Hub ids for the target, the data and a warm-start draft (app/hub.py), resolved from a cache laid out
the way huggingface_hub lays it out, offline: training, eagle-data, eagle-eval and eagle-export take them, a revision
picks its snapshot, and an id that is not cached or a value that is neither a path nor an id fails in one line."""

import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import torch

from test_registry import write_chat
from test_warm_start import recipe

from eagle_trainer import registry
from eagle_trainer.app import hub
from eagle_trainer.app.data import main as eagle_data
from eagle_trainer.app.evaluate import main as eagle_eval
from eagle_trainer.app.export import main as eagle_export
from eagle_trainer.app.train import run
from eagle_trainer.config import DataConfig
from eagle_trainer.drafts.io import load_draft

TARGET, CHATS, DRAFT = "tiny-org/qwen3", "tiny-org/chats", "tiny-org/qwen3-eagle3"


def cache_repo(cache: Path, repo: str, files: dict[str, Path], repo_type: str = "model", commit: str | None = None,
               ref: str | None = "main") -> str:
    """`files` (name in the repo -> a local file) as huggingface_hub caches a downloaded commit of `repo`: each file's
    bytes in blobs/<sha256>, snapshots/<commit>/<name> a relative symlink to its blob, refs/<ref> holding the commit.
    -> the commit."""
    folder = cache / f"{repo_type}s--{repo.replace('/', '--')}"
    commit = commit or hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest()
    for name, source in files.items():
        data = Path(source).read_bytes()
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = folder / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref is not None:
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / ref).write_text(commit)
    return commit


def files_of(directory: Path) -> dict[str, Path]:
    return {str(p.relative_to(directory)): p for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def snapshot(cache: Path, repo: str, commit: str, repo_type: str = "model") -> Path:
    return cache / f"{repo_type}s--{repo.replace('/', '--')}" / "snapshots" / commit


def offline_cache(monkeypatch, cache: Path) -> Path:
    """HF_HUB_CACHE at `cache` and HF_HUB_OFFLINE=1, set after huggingface_hub was imported (hub.py reads them at
    call time)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture(scope="module")
def cached(tiny_qwen3_path, tmp_path_factory):
    """The tiny target and a chat data set in a Hugging Face cache; a draft trained 2 steps on them by their Hub
    ids, exported (sglang, fp32) and cached as a model repo too. -> (work dir, cache, commits by repo, Summary)"""
    work = tmp_path_factory.mktemp("hub")
    cache = work / "hf"
    commits = {TARGET: cache_repo(cache, TARGET, files_of(tiny_qwen3_path)),
               CHATS: cache_repo(cache, CHATS, {"train.jsonl": write_chat(work / "chat.jsonl", n=40)}, "dataset")}
    with pytest.MonkeyPatch.context() as mp:
        offline_cache(mp, cache)
        cfg = recipe(TARGET, CHATS, work / "run", 2)
        cfg.train.export_formats = ["vllm"]
        summary = run(cfg)
    export = registry.export_formats()["sglang"].write(summary.checkpoint, work / "sglang", dtype=torch.float32)
    commits[DRAFT] = cache_repo(cache, DRAFT, files_of(export))
    return work, cache, commits, summary


def test_a_run_trains_on_a_cached_target_and_data_set_by_their_hub_ids(cached):
    work, cache, commits, summary = cached
    assert summary.checkpoint is not None
    recorded = json.loads((work / "run/config.json").read_text())
    assert recorded["target"]["path"] == str(snapshot(cache, TARGET, commits[TARGET]))
    assert recorded["data"]["path"] == str(snapshot(cache, CHATS, commits[CHATS], "dataset") / "train.jsonl")
    # vllm serve finds the target on the Hub, not in this machine's cache
    vllm = json.loads((work / "run/export/vllm/config.json").read_text())
    assert vllm["speculators_config"]["verifier"]["name_or_path"] == TARGET


def test_init_from_a_hub_draft_starts_where_it_ended(cached, tmp_path, monkeypatch):
    work, cache, _, summary = cached
    offline_cache(monkeypatch, cache)
    warm = run(recipe(TARGET, CHATS, tmp_path / "warm", 1, init_from=DRAFT))
    torch.testing.assert_close(warm.eval_before["loss"], summary.eval_after["loss"], rtol=1e-6, atol=0)


def test_a_revision_picks_its_snapshot(cached, tmp_path, monkeypatch):
    work, cache, commits, _ = cached
    offline_cache(monkeypatch, cache)
    old = "0" * 40  # an earlier commit, still cached: main points at the other one
    cache_repo(cache, CHATS, {"train.jsonl": write_chat(tmp_path / "old.jsonl", n=8)}, "dataset", commit=old, ref=None)
    newest = snapshot(cache, CHATS, commits[CHATS], "dataset") / "train.jsonl"
    assert hub.resolve(CHATS, kind="data", what="data.path") == str(newest)
    assert hub.resolve(f"{CHATS}@{old}", kind="data", what="data.path") == str(
        snapshot(cache, CHATS, old, "dataset") / "train.jsonl")
    assert hub.resolve(f"{TARGET}@{commits[TARGET]}", kind="target", what="target.path") == str(
        snapshot(cache, TARGET, commits[TARGET]))
    cache_repo(cache, CHATS, {}, "dataset", commit=commits[CHATS], ref="v1")  # a tag
    assert hub.resolve(f"{CHATS}@v1/train.jsonl", kind="data", what="data.path") == str(newest)


def test_a_data_set_id_names_its_one_jsonl_file(tmp_path, monkeypatch):
    cache = offline_cache(monkeypatch, tmp_path / "hf")
    one = write_chat(tmp_path / "a.jsonl", n=2)
    commit = cache_repo(cache, "org/two", {"train/a.jsonl": one, "eval/b.jsonl": one, "README.md": one}, "dataset")
    root = snapshot(cache, "org/two", commit, "dataset")
    assert hub.resolve("org/two/eval/b.jsonl", kind="data", what="data.path") == str(root / "eval/b.jsonl")
    assert hub.resolve("org/two/train", kind="data", what="data.path") == str(root / "train/a.jsonl")  # a folder
    with pytest.raises(ValueError, match=r"^data.path='org/two': the Hub data set org/two has 2 chat JSONL files "
                                         r"\(eval/b.jsonl, train/a.jsonl\); pick one as data.path=org/two/<file>$"):
        hub.resolve("org/two", kind="data", what="data.path")
    with pytest.raises(ValueError, match=r"the Hub data set org/two has no \*.jsonl file at 'test'"):
        hub.resolve("org/two/test", kind="data", what="data.path")


def test_an_existing_local_path_wins_over_a_hub_id(tmp_path, monkeypatch):
    offline_cache(monkeypatch, tmp_path / "hf")
    monkeypatch.chdir(tmp_path)
    Path("org/name").mkdir(parents=True)  # a relative path that is also a well-formed id
    assert hub.resolve("org/name", kind="target", what="target.path") == "org/name"


def test_an_uncached_id_offline_is_one_line_naming_the_cache_and_the_fix(tiny_qwen3_path, tmp_path, monkeypatch):
    cache = offline_cache(monkeypatch, tmp_path / "hf")
    message = (rf"^target.path='org/absent' is neither a local directory nor in the Hugging Face cache "
               rf"\(HF_HUB_CACHE={cache}\), and the Hub cannot be reached \(offline: HF_HUB_OFFLINE=1\): download "
               r"it where the Hub is reachable with `hf download org/absent` or set target.path to a local "
               r"directory$")
    monkeypatch.setattr("eagle_trainer.app.train.open_target", lambda *a, **k: pytest.fail("the target was loaded"))
    with pytest.raises(ValueError, match=message):
        run(recipe("org/absent", tmp_path / "chat.jsonl", tmp_path / "run", 1))
    with pytest.raises(ValueError, match=r"^data.path='org/chats@v2' is neither a local file nor in the Hugging Face "
                                         r"cache .*`hf download org/chats --repo-type dataset --revision v2` or set "
                                         r"data.path to a local file$"):
        run(recipe(tiny_qwen3_path, "org/chats@v2", tmp_path / "run", 1))
    with pytest.raises(ValueError, match=r"^--checkpoint='org/draft' is neither a local directory nor in the Hugging "
                                         r"Face cache"):
        eagle_export(["--checkpoint", "org/draft", "--format", "sglang", "--out", str(tmp_path / "x")])


@pytest.mark.parametrize("value", ["/nowhere/qwen3", "qwen3", "./models/qwen3", "org/name/../x", "org--x/name"])
def test_neither_a_path_nor_an_id_is_one_line(tmp_path, monkeypatch, value):
    offline_cache(monkeypatch, tmp_path / "hf")
    assert hub.parse_hub_id(value) is None
    with pytest.raises(ValueError, match=rf"^target\.path={re.escape(repr(value))} does not exist as a local "
                                         r"directory and is not a Hub id \(org/name\[@revision\]\); set it to a "
                                         r"local directory or a Hugging Face repo id$"):
        hub.resolve(value, kind="target", what="target.path")


def test_offline_training_leaves_the_unread_data_path_alone(tmp_path, monkeypatch):
    offline_cache(monkeypatch, tmp_path / "hf")
    cfg = recipe(tmp_path, "org/not-cached", tmp_path / "run", 1)
    cfg.data = DataConfig(path="org/not-cached", offline_path=str(tmp_path))
    resolved, ids = hub.resolve_recipe(cfg)
    assert resolved.data.path == "org/not-cached" and ids == {}


def test_the_commands_take_hub_ids(cached, tmp_path, monkeypatch):
    """eagle-data vocab (--tokenizer, --data), eagle-eval (--target, --draft, --data), eagle-export (--checkpoint)."""
    work, cache, commits, summary = cached
    offline_cache(monkeypatch, cache)
    assert eagle_data(["vocab", "--tokenizer", TARGET, "--data", CHATS, "--draft-vocab-size", "64",
                       "--out", str(tmp_path / "vocab.safetensors")]) == 0
    assert (tmp_path / "vocab.safetensors").is_file()
    assert eagle_eval(["--target", TARGET, "--draft", DRAFT, "--data", CHATS, "--out", str(tmp_path / "eval.json"),
                       "--mode", "chain", "--num-prompts", "1", "--max-new-tokens", "2", "--ttt-steps", "2",
                       "--no-progress"]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["target"] == str(snapshot(cache, TARGET, commits[TARGET]))
    assert result["draft"] == str(snapshot(cache, DRAFT, commits[DRAFT]))
    checkpoint = f"tiny-org/run@{cache_repo(cache, 'tiny-org/run', files_of(summary.checkpoint))}"
    assert eagle_export(["--checkpoint", checkpoint, "--format", "vllm", "--out", str(tmp_path / "vllm")]) == 0
    exported = registry.export_formats()["vllm"].read(tmp_path / "vllm")
    torch.testing.assert_close(exported.d2t, load_draft(summary.checkpoint).d2t)
