"""`eagle-data dump` under torchrun with the target sharded over the ranks writes what one process writes.

Each rank runs `eagle-data dump ... parallel=fsdp_ep parallel.ep=E` (FSDP2 + expert parallelism: no rank holds
the whole target); rank 0 alone writes. Every file of the dump but run.json (how it ran) must be byte for byte
the one-process dump's. fp32 and the Triton MoE core (run by Triton's interpreter on the CPU): the sharded target
then gives the whole target's bits. Five examples in batches of 2 are 3 batches, a multiple of neither world size:
the last round leaves ranks idle in the target's lock step. Bad parallel options and a vocab map of another target
are refused before any weight is read (the weights file of that target is garbage).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from eagle_trainer.app.data import main
from eagle_trainer.data.offline import RUN_FILE, OfflineStore
from eagle_trainer.data.vocab import save_vocab_map
from eagle_trainer.targets.tiny import save_tiny_checkpoint, tiny_qwen3_moe_config, tiny_qwen3_next_config
from eagle_trainer.targets.tiny_tokenizer import synthetic_corpus
from ranks import run_ranks

NUM_EXAMPLES, BATCH_SIZE = 5, 2


def write_chat(path, num_conversations: int):
    """Short conversations of different lengths (the interpreted MoE core's time grows with the tokens)."""
    lines = synthetic_corpus(2 * num_conversations, seed=3)
    with open(path, "w") as f:
        for i in range(num_conversations):
            user, assistant = (" ".join(lines[2 * i + j].split()[:1 + i // 2]) for j in (0, 1))
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def dump_argv(target, root, out, *parallel) -> list[str]:
    return ["dump", "--target", str(target), "--data", str(root / "chat.jsonl"), "--vocab",
            str(root / "vocab.safetensors"), "--out", str(out), "--cache-dir", str(root / "cache"), "--batch-size",
            str(BATCH_SIZE), "--max-length", "40", "--dtype", "float32", "--moe-impl", "triton", "--device", "cpu",
            "--aux-layers", "0,1,2", "--no-progress", *parallel]


def dump_on_rank(rank: int, argv: list[str]) -> None:
    main(argv)


# 4 decoder layers (Qwen3-Next: gated delta net at 0-2, full attention at 3): the interpreted MoE core costs time
# per layer
TARGETS = {"moe": tiny_qwen3_moe_config, "next": tiny_qwen3_next_config}


@pytest.fixture(scope="module", params=sorted(TARGETS))
def one_process(request, tmp_path_factory):
    """(target, root with data and vocab map, the one-process dump's directory)."""
    config = TARGETS[request.param](vocab_size=1024, hidden_size=64, num_layers=4, num_experts=8, top_k=2)
    target = save_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny_{request.param}"), config, logit_std=6.0)
    root = tmp_path_factory.mktemp("dump_ranks")
    write_chat(root / "chat.jsonl", NUM_EXAMPLES)
    main(["vocab", "--tokenizer", str(target), "--data", str(root / "chat.jsonl"), "--draft-vocab-size", "64",
          "--out", str(root / "vocab.safetensors"), "--max-length", "40", "--cache-dir", str(root / "cache")])
    main(dump_argv(target, root, root / "one"))
    return target, root, root / "one"


def dump_files(directory) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(directory.iterdir()) if f.name != RUN_FILE}


# each target once and each world size once (the ranks start as fresh processes: most of the time is start-up)
@pytest.mark.parametrize("one_process, world, ep", [("moe", 4, 2), ("next", 2, 2)], indirect=["one_process"])
def test_sharded_dump_is_byte_identical_to_one_process(one_process, tmp_path, world, ep):
    target, root, one = one_process
    argv = dump_argv(target, root, tmp_path / "ranks", "parallel=fsdp_ep", f"parallel.ep={ep}")
    run_ranks(world, dump_on_rank, argv)
    want, got = dump_files(one), dump_files(tmp_path / "ranks")
    assert sorted(got) == sorted(want) == ["index.json", "manifest.json", "shard-00000.safetensors",
                                           "vocab.safetensors"]
    for name in want:
        assert got[name] == want[name], name
    assert json.loads((one / RUN_FILE).read_text()).items() >= {"world_size": 1, "ep": 1, "sharded": False}.items()
    ran = json.loads((tmp_path / "ranks" / RUN_FILE).read_text())
    assert ran.items() >= {"world_size": world, "ep": ep, "sharded": True}.items() and ran["tokens_per_s"] > 0
    store = OfflineStore(tmp_path / "ranks")
    assert len(store) == NUM_EXAMPLES and store.manifest["batch_size"] == BATCH_SIZE
    assert -(-NUM_EXAMPLES // BATCH_SIZE) % world  # the last round is short: some ranks only idled in it


def write_vocab_map(path, target_vocab_size: int) -> None:
    """A draft vocab of the first 4 target ids."""
    save_vocab_map(path, torch.zeros(4, dtype=torch.int64), torch.arange(target_vocab_size) < 4)


@pytest.fixture
def weightless_target(tiny_qwen3_moe_path, tmp_path):
    """The tiny Qwen3-MoE's config and tokenizer with a weights file that is not safetensors (a command that reads
    the weights fails on it, so an error about anything else came first); data and a vocab map for it."""
    target = tmp_path / "target"
    shutil.copytree(tiny_qwen3_moe_path, target)
    (target / "model.safetensors").write_bytes(b"not safetensors")
    write_chat(tmp_path / "chat.jsonl", 2)
    write_vocab_map(tmp_path / "vocab.safetensors", 1024)
    return target


@pytest.mark.parametrize("world, options, message", [
    (2, ["parallel=fsdp_ep", "parallel.ep=3"], r"parallel.ep=3 does not divide the world size 2; use a divisor"),
    (3, ["parallel=fsdp_ep"], r"parallel.ep=3 does not divide the target's 8 routed experts; pick an ep"),
])
def test_bad_ep_is_refused_before_the_weights_are_read(weightless_target, tmp_path, world, options, message):
    with pytest.raises(Exception, match=message):  # the ranks' ValueError, raised again by run_ranks
        run_ranks(world, dump_on_rank, dump_argv(weightless_target, tmp_path, tmp_path / "out", *options))
    assert not (tmp_path / "out").exists()


def test_vocab_map_of_another_target_is_refused_before_the_weights_are_read(weightless_target, tmp_path):
    with pytest.raises(ValueError, match="corrupt or truncated"):  # past the checks, the weights are read
        main(dump_argv(weightless_target, tmp_path, tmp_path / "out"))
    write_vocab_map(tmp_path / "vocab.safetensors", 512)  # this target has 1024 ids
    with pytest.raises(ValueError, match=r"vocab of 512 ids but .* has vocab_size 1024; build the map for this "
                                         r"target with `eagle-data vocab --tokenizer"):
        main(dump_argv(weightless_target, tmp_path, tmp_path / "out"))
    assert not (tmp_path / "out").exists()
