"""Draft vocab map: most frequent loss ids, sorted, d2t offsets, padding, coverage, file round trip, CLI."""

import json
from collections import Counter

import datasets
import pytest
import torch
from safetensors.torch import save_file

from eagle_trainer.app.data import main
from eagle_trainer.data.dataset import FEATURES
from eagle_trainer.targets.tiny_tokenizer import save_tiny_tokenizer, synthetic_corpus
from eagle_trainer.data.vocab import (
    build_vocab_map, count_loss_tokens, draft_ids_from_d2t, load_vocab_map, save_vocab_map, vocab_coverage,
    vocab_map_from_counts,
)


def toy_dataset(rows):
    return datasets.Dataset.from_dict(
        {"input_ids": [r[0] for r in rows], "loss_mask": [r[1] for r in rows]}, features=FEATURES
    )


def test_counts_only_loss_tokens():
    ds = toy_dataset([([1, 2, 3, 3], [False, True, True, True]), ([9, 3], [True, False])])
    counts = count_loss_tokens(ds, 10)
    assert counts.tolist() == [0, 0, 1, 2, 0, 0, 0, 0, 0, 1]
    with pytest.raises(ValueError, match="outside the target vocabulary"):
        count_loss_tokens(ds, 5)


def test_most_frequent_sorted_with_ties_to_lower_id():
    counts = torch.tensor([0, 5, 2, 2, 7, 2, 0, 1])
    d2t, t2d = vocab_map_from_counts(counts, 4)
    assert draft_ids_from_d2t(d2t).tolist() == [1, 2, 3, 4]  # 4 and 1, then the tie 2,3,5 keeps 2 and 3
    assert d2t.dtype == torch.int64 and d2t.tolist() == [1, 1, 1, 1]
    assert t2d.dtype == torch.bool and t2d.nonzero().flatten().tolist() == [1, 2, 3, 4]


def test_padding_with_smallest_unused_ids():
    counts = torch.tensor([0, 0, 3, 0, 1, 0, 0, 0])
    d2t, t2d = vocab_map_from_counts(counts, 5)
    assert draft_ids_from_d2t(d2t).tolist() == [0, 1, 2, 3, 4]
    assert vocab_coverage(counts, t2d) == 1.0
    d2t, _ = vocab_map_from_counts(torch.tensor([0, 0, 3, 0, 1, 0, 9, 0]), 4)
    assert draft_ids_from_d2t(d2t).tolist() == [0, 2, 4, 6]


def test_draft_vocab_larger_than_target_is_refused():
    ds = toy_dataset([([1, 2], [True, True])])
    with pytest.raises(ValueError, match="draft_vocab_size=11"):
        build_vocab_map(ds, 10, 11)


def test_build_on_dataset_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(20):
        n = int(torch.randint(3, 30, (1,), generator=g))
        ids = (torch.randint(0, 64, (n,), generator=g) ** 2 // 64).tolist()  # skewed toward small ids
        rows.append((ids, (torch.rand(n, generator=g) < 0.6).tolist()))
    d2t, t2d = build_vocab_map(toy_dataset(rows), 100, 16)
    draft_ids = draft_ids_from_d2t(d2t)
    assert draft_ids.tolist() == sorted(draft_ids.tolist()) and len(set(draft_ids.tolist())) == 16
    assert torch.equal(d2t, draft_ids - torch.arange(16))
    assert torch.equal(t2d.nonzero().flatten(), draft_ids)
    counter = Counter(t for ids, mask in rows for t, m in zip(ids, mask) if m)
    expected = sorted(sorted(counter, key=lambda t: (-counter[t], t))[:16])
    assert draft_ids.tolist() == expected


def test_save_load_round_trip_and_uint8(tmp_path):
    d2t, t2d = vocab_map_from_counts(torch.tensor([3, 0, 1, 5, 0, 2]), 3)
    save_vocab_map(tmp_path / "v" / "vocab.safetensors", d2t, t2d)
    d2t2, t2d2 = load_vocab_map(tmp_path / "v" / "vocab.safetensors")
    assert torch.equal(d2t2, d2t) and torch.equal(t2d2, t2d) and t2d2.dtype == torch.bool
    save_file({"d2t": d2t, "t2d": t2d.to(torch.uint8)}, str(tmp_path / "u8.safetensors"))
    assert torch.equal(load_vocab_map(tmp_path / "u8.safetensors")[1], t2d)
    save_file({"d2t": d2t + 1, "t2d": t2d}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="different ids"):
        load_vocab_map(tmp_path / "bad.safetensors")


def test_a_save_that_dies_midway_leaves_the_old_map(tmp_path, monkeypatch):
    """The map is written beside its path and renamed into place: a crash while writing (here, after half a file)
    leaves the previous map readable and no half file at the path."""
    import eagle_trainer.data.vocab as vocab

    path = tmp_path / "vocab.safetensors"
    d2t, t2d = vocab_map_from_counts(torch.tensor([3, 0, 1, 5, 0, 2]), 3)
    save_vocab_map(path, d2t, t2d)

    def dies_midway(tensors, filename):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 7)
        raise OSError("disk full")

    monkeypatch.setattr(vocab, "save_file", dies_midway)
    with pytest.raises(OSError, match="disk full"):
        save_vocab_map(path, d2t, t2d)
    assert torch.equal(load_vocab_map(path)[0], d2t) and [p.name for p in tmp_path.iterdir()] == [path.name]


def write_pairs(path, n: int) -> None:
    """n conversations of one user line and one assistant line (synthetic_corpus, seed 3)."""
    lines = synthetic_corpus(2 * n, seed=3)
    with open(path, "w") as f:
        for i in range(n):
            messages = [{"role": "user", "content": lines[2 * i]}, {"role": "assistant", "content": lines[2 * i + 1]}]
            f.write(json.dumps({"messages": messages}) + "\n")


def test_cli_vocab(tmp_path, capsys):
    tokenizer = save_tiny_tokenizer(tmp_path / "tok")
    write_pairs(tmp_path / "d.jsonl", 20)
    out = tmp_path / "run" / "vocab.safetensors"
    main(["vocab", "--tokenizer", str(tmp_path / "tok"), "--data", str(tmp_path / "d.jsonl"),
          "--draft-vocab-size", "64", "--out", str(out)])
    printed = capsys.readouterr().out
    summary = json.loads(printed.strip().splitlines()[-1])
    assert "distinct loss-token ids" in printed and 64 < summary["distinct_loss_ids"] <= len(tokenizer)
    assert 0.3 < summary["coverage"] < 1.0 and summary["target_vocab_size"] == len(tokenizer)
    d2t, t2d = load_vocab_map(out)
    assert d2t.shape == (64,) and t2d.shape == (len(tokenizer),)
    assert (tmp_path / "run" / "cache").is_dir()


def test_cli_vocab_renders_the_data_as_training_does(tmp_path, capsys):
    """--chat-template, --chat-template-kwargs and --empty-think count the loss tokens of data.chat_template,
    chat_template_kwargs and empty_think."""
    from pathlib import Path

    from eagle_trainer.config import DataConfig
    from eagle_trainer.data.dataset import build_dataset

    tokenizer = save_tiny_tokenizer(tmp_path / "tok")
    write_pairs(tmp_path / "d.jsonl", 6)
    qwen3 = str(Path(__file__).parents[1] / "fixtures" / "qwen3_chat_template.jinja")
    counts = {}
    for policy in ("auto", "train"):
        main(["vocab", "--tokenizer", str(tmp_path / "tok"), "--data", str(tmp_path / "d.jsonl"), "--draft-vocab-size",
              "64", "--out", str(tmp_path / f"{policy}.safetensors"), "--chat-template", qwen3,
              "--chat-template-kwargs", '{"enable_thinking": false}', "--empty-think", policy])
        counts[policy] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["num_loss_tokens"]
        cfg = DataConfig(path=str(tmp_path / "d.jsonl"), chat_template=qwen3,
                         chat_template_kwargs={"enable_thinking": False}, empty_think=policy)
        assert build_dataset(cfg, tokenizer, tmp_path / "cache")[1]["num_loss_tokens"] == counts[policy]
    think = len(tokenizer("<think>\n\n</think>\n\n", add_special_tokens=False)["input_ids"])
    assert counts["train"] == counts["auto"] + 6 * think  # each reply's empty think block, masked under auto
