"""Offline mode: dump the target's captured states, read them back, and train on them as online training would."""

import json
import os
import shutil
import socket
import threading

import pytest
import torch
import torch.multiprocessing as mp
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from batches import draft_vocab

from eagle_trainer.app.data import main
from eagle_trainer.config import DataConfig, TargetConfig
from eagle_trainer.data.dataset import batches, build_dataset, collate
from eagle_trainer.data.dump import dump_hidden_states
from eagle_trainer.data.offline import (
    RUN_FILE,
    OfflineStore,
    collate_offline,
    dequantize_fp8,
    dump_manifest,
    expected_manifest,
    quantize_fp8,
)
from eagle_trainer.data.vocab import save_vocab_map
from eagle_trainer.targets.frozen import FrozenTarget
from eagle_trainer.targets.loading import load_target, target_fingerprint
from eagle_trainer.targets.offline import OfflineTarget
from eagle_trainer.targets.tiny_tokenizer import synthetic_corpus

NUM_EXAMPLES = 11
AUX_IDS = (1, 3, 4)


def write_chat(path, num_conversations, seed=7):
    lines = synthetic_corpus(2 * num_conversations, seed=seed)
    with open(path, "w") as f:
        for i in range(num_conversations):
            messages = [{"role": "user", "content": lines[2 * i]}, {"role": "assistant", "content": lines[2 * i + 1]}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


@pytest.fixture(scope="module")
def env(tiny_qwen3_path, tmp_path_factory):
    """Target, dataset, vocab map and a bit-exact dump (batch_size 1, fp32, last hidden, several shards)."""
    root = tmp_path_factory.mktemp("offline")
    model, tokenizer, spec, info = load_target(TargetConfig(path=str(tiny_qwen3_path)), torch.device("cpu"))
    draft_ids, t2d = draft_vocab(info.vocab_size, 200)
    d2t = draft_ids - torch.arange(200)
    save_vocab_map(root / "vocab.safetensors", d2t, t2d)
    data = write_chat(root / "chat.jsonl", NUM_EXAMPLES)
    dataset, stats = build_dataset(DataConfig(path=str(data), max_length=48), tokenizer, root / "cache")
    target = FrozenTarget(model, spec, AUX_IDS, draft_ids, t2d)
    manifest = dump_manifest(tiny_qwen3_path, target_fingerprint(tiny_qwen3_path), info.architecture, d2t, t2d,
                             stats["fingerprint"])
    result = dump_hidden_states(target, dataset, root / "exact", manifest=manifest, batch_size=1,
                                progress=False, shard_bytes=64 << 10)
    return dict(root=root, path=tiny_qwen3_path, target=target, dataset=dataset, stats=stats, d2t=d2t, t2d=t2d,
                draft_ids=draft_ids, manifest=manifest, result=result, data=data, info=info)


def captured_alone(env, i):
    row = env["dataset"][i]
    return env["target"].capture(collate([row], pad_id=0), argmax=True)


def test_dump_round_trip_is_bit_exact(env):
    store = OfflineStore(env["root"] / "exact")
    lengths = [len(r) for r in env["dataset"]["input_ids"]]
    assert len(store) == NUM_EXAMPLES and store.lengths == lengths and len(set(lengths)) > 3
    assert any(n % 2 for n in lengths)
    assert len(list((env["root"] / "exact").glob("shard-*.safetensors"))) > 1  # rolled over at 64 KiB
    for i in range(NUM_EXAMPLES):
        ex, ref = store.example(i), captured_alone(env, i)
        row = env["dataset"][i]
        assert ex["input_ids"].tolist() == row["input_ids"] and ex["loss_mask"].tolist() == row["loss_mask"]
        for name in ("aux_hidden", "final_hidden", "argmax_valid"):
            assert torch.equal(ex[name], getattr(ref, name)[0]), (i, name)
    m, r = store.manifest, env["result"]
    assert m["aux_layer_ids"] == list(AUX_IDS) and m["dtype"] == "float32" and m["hidden_size"] == 64
    assert m["contents"] == ["input_ids", "loss_mask", "aux_hidden", "final_hidden", "argmax_valid"]
    assert m["data_fingerprint"] == env["stats"]["fingerprint"] and m["compression_error"] == {}
    assert r["num_examples"] == NUM_EXAMPLES and r["num_tokens"] == sum(lengths) == m["num_tokens"]
    # fp32: (3 + 1) * 64 * 4 bytes of hidden state per token, plus ids, masks and headers
    assert 4 * 64 * 4 < r["bytes_per_token"] < 4 * 64 * 4 * 1.5


def test_batched_dump_is_close_to_the_exact_one(env, tmp_path):
    out = tmp_path / "batched"
    dump_hidden_states(env["target"], env["dataset"], out, manifest=env["manifest"], batch_size=4, progress=False)
    exact, batched = OfflineStore(env["root"] / "exact"), OfflineStore(out)
    assert batched.manifest["contents"] == ["input_ids", "loss_mask", "aux_hidden", "final_hidden", "argmax_valid"]
    for i in range(NUM_EXAMPLES):
        a, b = exact.example(i), batched.example(i)
        assert "last_hidden" not in b and torch.equal(a["input_ids"], b["input_ids"])
        torch.testing.assert_close(b["aux_hidden"], a["aux_hidden"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b["final_hidden"], a["final_hidden"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed,epoch,shuffle,rank,world_size,start", [
    (0, 0, False, 0, 1, 0), (3, 1, True, 1, 2, 0), (3, 1, True, 0, 2, 1), (5, 2, True, 2, 3, 0),
])
def test_store_batches_follow_the_online_order(env, seed, epoch, shuffle, rank, world_size, start):
    store = OfflineStore(env["root"] / "exact")
    kw = dict(seed=seed, epoch=epoch, shuffle=shuffle, rank=rank, world_size=world_size, pad_id=5, start=start)
    online = list(batches(env["dataset"], 2, **kw))
    offline = list(store.batches(2, **kw))
    assert len(offline) == len(online) > 0
    for on, off in zip(online, offline):
        for name in ("input_ids", "loss_mask", "attention_mask"):
            assert torch.equal(getattr(off, name), getattr(on, name)), name
        pad = ~off.attention_mask
        assert not off.states.argmax_valid[pad].any() and not off.states.aux_hidden[pad].any()
        assert off.states.final_hidden.shape == (*off.input_ids.shape, 64)


def test_store_packs_batches_as_the_online_collate(env):
    """data.pack offline: the same examples per batch as unpacked, tokens as the online packed batch, and each
    example's stored states back to back; fp8 scales travel with them and pad_to_multiple pads them too."""
    store = OfflineStore(env["root"] / "exact")
    kw = {"seed": 2, "epoch": 0, "shuffle": True, "pad_id": 5}
    online = list(batches(env["dataset"], 3, pack=True, **kw))
    padded = list(store.batches(3, **kw))
    packed = list(store.batches(3, pack=True, **kw))
    assert len(packed) == len(padded) == len(online) > 0
    for on, pad, off in zip(online, padded, packed):
        for name in ("input_ids", "loss_mask", "attention_mask", "position_ids", "cu_seqlens"):
            assert torch.equal(getattr(off, name), getattr(on, name)), name
        real = pad.attention_mask
        for name in ("aux_hidden", "final_hidden", "argmax_valid"):
            assert torch.equal(getattr(off.states, name)[0], getattr(pad.states, name)[real]), name
    wide = packed[0].pad_to_multiple(16, pad_id=5).to("cpu")
    n = packed[0].input_ids.shape[1]
    assert wide.input_ids.shape[1] % 16 == 0 and wide.cu_seqlens[-1] == wide.input_ids.shape[1]
    assert wide.states.aux_hidden.shape[:2] == wide.input_ids.shape and not wide.states.argmax_valid[0, n:].any()
    assert torch.equal(wide.position_ids[0, :n], packed[0].position_ids[0])
    fp8 = collate_offline([{"input_ids": torch.tensor([1, 2]), "loss_mask": torch.ones(2, dtype=torch.bool),
                            "argmax_valid": torch.ones(2, dtype=torch.bool),
                            "final_hidden": torch.ones(2, 4), "aux_hidden": torch.ones(2, 4) * i,
                            "aux_hidden.scale": torch.full((2, 1), 0.5 * i)} for i in (1, 2)], 0, pack=True)
    assert fp8.scales["aux_hidden"].shape == (1, 4, 1) and fp8.cu_seqlens.tolist() == [0, 2, 4]
    moved = fp8.to("cpu")  # dequantised on the device: q * scale
    assert moved.states.aux_hidden[0, :, 0].tolist() == [0.5, 0.5, 2.0, 2.0] and moved.cu_seqlens is not None


def test_select_is_a_view_like_dataset_select(env):
    store = OfflineStore(env["root"] / "exact")
    tail = store.select(range(NUM_EXAMPLES - 4, NUM_EXAMPLES)).select([3, 1])
    assert len(tail) == 2 and tail.lengths == [store.lengths[10], store.lengths[8]]
    assert torch.equal(tail.example(0)["aux_hidden"], store.example(10)["aux_hidden"])
    online = list(batches(env["dataset"].select([10, 8]), 1, seed=0, epoch=0, shuffle=False))
    offline = list(tail.batches(1, seed=0, epoch=0, shuffle=False))
    assert [b.input_ids.tolist() for b in offline] == [b.input_ids.tolist() for b in online]


def test_offline_target_equals_frozen_target(env):
    store = OfflineStore(env["root"] / "exact")
    offline = OfflineTarget.from_checkpoint(env["path"], env["draft_ids"], True, torch.device("cpu"), torch.float32)
    online = env["target"]
    assert torch.equal(offline.draft_head, online.draft_head)
    assert torch.equal(offline.input_embedding(), online.input_embedding())
    assert offline.lm_head is None  # the whole [V, Ht] head is kept only for drafts that decode with it
    kept = OfflineTarget.from_checkpoint(env["path"], env["draft_ids"], True, torch.device("cpu"), torch.float32,
                                         keep_lm_head=True)
    assert torch.equal(kept.target_head(), online.target_head())
    kw = dict(seed=1, epoch=0, shuffle=True)
    # batch_size 1: the same shapes online and offline, so the same bits
    for mask in (True, False):
        online.mask_teacher_argmax = offline.mask_teacher_argmax = mask
        for on_batch, off_batch in zip(batches(env["dataset"], 1, **kw), store.batches(1, **kw)):
            on, off = online.forward(on_batch), offline.forward(off_batch.to("cpu"))
            for name in ("aux_hidden", "final_hidden", "teacher_logits", "teacher_valid"):
                assert torch.equal(getattr(off, name), getattr(on, name)), name
    online.mask_teacher_argmax = offline.mask_teacher_argmax = True
    # batch_size 4: online rows are padded to other lengths than when dumped; equal up to fp32 rounding
    for on_batch, off_batch in zip(batches(env["dataset"], 4, **kw), store.batches(4, **kw)):
        on, off = online.forward(on_batch), offline.forward(off_batch.pad_to_multiple(16, 0))
        real = on_batch.attention_mask
        assert off.teacher_logits.shape[1] % 16 == 0 and not off.teacher_valid[:, real.shape[1]:].any()
        torch.testing.assert_close(off.teacher_probs()[:, :real.shape[1]][real], on.teacher_probs()[real],
                                   rtol=1e-5, atol=1e-6)
        assert torch.equal(off.teacher_valid[:, :real.shape[1]][real], on.teacher_valid[real])


def test_fp8_error_is_small_and_recorded(env, tmp_path):
    result = dump_hidden_states(env["target"], env["dataset"], tmp_path / "fp8", manifest=env["manifest"],
                                batch_size=1, compression="fp8", progress=False)
    store = OfflineStore(tmp_path / "fp8")
    assert store.manifest["compression"] == "fp8" and result["compression_error"] == store.manifest["compression_error"]
    assert set(result["compression_error"]) == {"aux_hidden"} and store.manifest["compressed"] == ["aux_hidden"]
    with safe_open(str(tmp_path / "fp8" / store._files[0]), framework="pt") as f:
        assert f.get_tensor("0.aux_hidden").dtype == torch.float8_e4m3fn
        assert f.get_tensor("0.aux_hidden.scale").shape == (store.lengths[0], 1)
        assert f.get_tensor("0.final_hidden").dtype == torch.float32  # the teacher's input stays exact
    ref = torch.cat([captured_alone(env, i).aux_hidden[0] for i in range(NUM_EXAMPLES)])
    got = torch.cat([store.example(i)["aux_hidden"] for i in range(NUM_EXAMPLES)])
    error = float((got - ref).norm() / ref.norm())
    assert 0 < error < 0.05
    assert error == pytest.approx(result["compression_error"]["aux_hidden"], rel=1e-4)
    for i in range(NUM_EXAMPLES):
        assert torch.equal(store.example(i)["final_hidden"], captured_alone(env, i).final_hidden[0])
    # fp32 target: aux goes from 4 bytes to 1 per element (+ a 4-byte scale per token); final stays at 4
    assert result["bytes_per_token"] < 0.5 * env["result"]["bytes_per_token"]
    # batches carry the one-byte values; moving a batch to its device dequantises, padding stays zero
    batch = next(store.batches(3, seed=0, epoch=0, shuffle=False, prefetch=0)).pad_to_multiple(64, 0)
    assert batch.states.aux_hidden.dtype == torch.float8_e4m3fn and set(batch.scales) == {"aux_hidden"}
    moved = batch.to("cpu")
    assert not moved.scales and moved.states.aux_hidden.dtype == torch.float32
    for row in range(3):
        n = store.lengths[row]
        assert torch.equal(moved.states.aux_hidden[row, :n].to(store.dtype), store.example(row)["aux_hidden"])
        assert (moved.states.aux_hidden[row, n:] == 0).all()


def test_fp8_zero_rows_and_range():
    x = torch.tensor([[0.0, 0.0], [1e-3, -2.0], [900.0, 3.0]])
    q, scale = quantize_fp8(x)
    assert scale[0, 0] == 1 and torch.isfinite(dequantize_fp8(q, scale, torch.float32)).all()
    torch.testing.assert_close(dequantize_fp8(q, scale, torch.float32)[:, 0], x[:, 0], rtol=0.07, atol=1e-3)


def test_check_refuses_a_dump_made_for_another_run(env, tmp_path):
    store = OfflineStore(env["root"] / "exact")
    info = env["info"]
    ok = expected_manifest(target_fingerprint(env["path"]), info.architecture, AUX_IDS, env["d2t"], env["t2d"])
    store.check(ok)
    other = tmp_path / "other_target"
    other.mkdir()
    config = json.loads((env["path"] / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    (other / "model.safetensors").symlink_to(env["path"] / "model.safetensors")
    t2d = env["t2d"].clone()
    t2d[int(torch.nonzero(~t2d)[0])] = True
    t2d[int(env["draft_ids"][0])] = False
    d2t = (torch.nonzero(t2d).flatten() - torch.arange(200))
    bad = expected_manifest(target_fingerprint(other), info.architecture, (1, 2, 4), d2t, t2d)
    with pytest.raises(ValueError) as e:
        store.check(bad)
    msg = str(e.value)
    for field in ("target.fingerprint", "aux_layer_ids", "vocab_map_sha256"):
        assert field in msg
    assert "target.architecture" not in msg and "[1, 3, 4]" in msg and "[1, 2, 4]" in msg
    assert "eagle-data dump" in msg and "data.offline_path" in msg


def test_a_dump_with_the_retired_last_hidden_still_loads(env, tmp_path):
    """Older dumps could also store the pre-norm last hidden state (and said so in the manifest): it is ignored."""
    old = tmp_path / "old"
    shutil.copytree(env["root"] / "exact", old)
    for shard in old.glob("shard-*.safetensors"):
        tensors = load_file(str(shard))
        tensors.update({k.replace(".final_hidden", ".last_hidden"): v.clone() for k, v in tensors.items()
                        if k.endswith(".final_hidden")})
        save_file(tensors, str(shard))
    manifest = json.loads((old / "manifest.json").read_text())
    manifest.update(keep_last_hidden=True, needs_last_hidden=True,
                    contents=["input_ids", "loss_mask", "aux_hidden", "final_hidden", "last_hidden", "argmax_valid"])
    (old / "manifest.json").write_text(json.dumps(manifest))
    store, exact = OfflineStore(old), OfflineStore(env["root"] / "exact")
    store.check(expected_manifest(target_fingerprint(env["path"]), env["info"].architecture, AUX_IDS, env["d2t"],
                                  env["t2d"]))
    assert store.example(0).keys() == exact.example(0).keys()
    batch = next(store.batches(2, seed=0, epoch=0, shuffle=False, prefetch=0))
    assert torch.equal(batch.states.final_hidden, next(exact.batches(2, seed=0, epoch=0, shuffle=False,
                                                                      prefetch=0)).states.final_hidden)


def test_incomplete_dump_is_refused(env, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="not a complete offline dump.*eagle-data dump"):
        OfflineStore(tmp_path)
    out = tmp_path / "redump"
    shutil.copytree(env["root"] / "exact", out)
    OfflineStore(out)
    calls = []

    def crash_on_third(batch, argmax=None):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return FrozenTarget.capture(env["target"], batch, argmax)

    monkeypatch.setattr(env["target"], "capture", crash_on_third)
    with pytest.raises(RuntimeError, match="out of memory"):
        dump_hidden_states(env["target"], env["dataset"], out, manifest=env["manifest"], batch_size=1, progress=False)
    with pytest.raises(ValueError, match="not a complete offline dump"):  # the old manifest went first
        OfflineStore(out)


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "offline-prefetch"]


def test_prefetch_raises_the_reader_error_and_stops_with_the_consumer(env, monkeypatch):
    store = OfflineStore(env["root"] / "exact")
    read = store.example

    def flaky(i, **kw):
        if i == 4:
            raise OSError("disk gone")
        return read(i, **kw)

    monkeypatch.setattr(store, "example", flaky)
    with pytest.raises(OSError, match="disk gone"):
        list(store.batches(1, seed=0, epoch=0, shuffle=False, prefetch=2))
    assert not _prefetch_threads()
    it = store.batches(1, seed=0, epoch=0, shuffle=False, prefetch=1)
    next(it)
    assert len(_prefetch_threads()) == 1
    it.close()  # the consumer stops early
    assert not _prefetch_threads()


def _cli_rank(rank, argv, port):
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    main(argv)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_dump_one_and_two_processes_write_the_same_bytes(env, tmp_path, capsys):
    """Two ranks (each with the whole target; batches of 4, the third on rank 0 alone) write what one process
    writes, byte for byte, fp8 error sums included; only run.json says how it ran."""
    def argv(out):
        return ["dump", "--target", str(env["path"]), "--data", str(env["data"]), "--vocab",
                str(env["root"] / "vocab.safetensors"), "--out", str(out), "--max-length", "48", "--batch-size", "4",
                "--aux-layers", "1,3,4", "--no-progress", "--cache-dir", str(tmp_path / "cache"), "--compress", "fp8",
                "--device", "cpu"]

    main(argv(tmp_path / "one"))
    printed = capsys.readouterr().out
    assert f"dumped {NUM_EXAMPLES} examples" in printed and "compression error aux_hidden 0.0" in printed
    assert "on 1 rank(s), ep 1, target whole" in printed and str(tmp_path / "one") in printed
    mp.spawn(_cli_rank, args=(argv(tmp_path / "two"), _free_port()), nprocs=2)
    files = {d: sorted(f.name for f in (tmp_path / d).iterdir()) for d in ("one", "two")}
    assert files["one"] == files["two"] == ["index.json", "manifest.json", "run.json", "shard-00000.safetensors",
                                            "vocab.safetensors"]
    for name in files["one"]:
        if name != RUN_FILE:
            assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    runs = [json.loads((tmp_path / d / RUN_FILE).read_text()) for d in ("one", "two")]
    assert [(r["world_size"], r["ep"], r["sharded"]) for r in runs] == [(1, 1, False), (2, 1, False)]
    one = OfflineStore(tmp_path / "one")
    assert "world_size" not in one.manifest and "created" not in one.manifest and one.manifest["batch_size"] == 4
    assert one.manifest["vocab_map_sha256"] == env["manifest"]["vocab_map_sha256"]
    assert one.manifest["target"] == env["manifest"]["target"] and one.manifest["compressed"] == ["aux_hidden"]
    exact = OfflineStore(env["root"] / "exact")
    for i in range(NUM_EXAMPLES):
        a, c = one.example(i), exact.example(i)
        assert a.keys() == c.keys() and torch.equal(a["input_ids"], c["input_ids"])
        torch.testing.assert_close(a["final_hidden"], c["final_hidden"], rtol=1e-5, atol=1e-5)


def test_a_per_rank_dump_still_reads_and_a_new_dump_replaces_it(env, tmp_path):
    """Dumps of the older layout (each rank its shards and index, merged into index.json) read as before; a dump
    into their directory removes all of their files."""
    old = tmp_path / "old"
    shutil.copytree(env["root"] / "exact", old)
    index = json.loads((old / "index.json").read_text())
    renamed = {}
    for i, entry in index.items():
        rank = int(i) % 2
        name = renamed.setdefault((entry["file"], rank), f"shard-r{rank:03d}-{len(renamed):05d}.safetensors")
        entry["file"] = name
    for shard in sorted(old.glob("shard-*.safetensors")):
        tensors = load_file(str(shard))
        for (file, rank), name in renamed.items():
            if file == shard.name:
                part = {k: v for k, v in tensors.items() if int(k.split(".")[0]) % 2 == rank}
                save_file(part, str(old / name), metadata={"format": "pt"})
        shard.unlink()
    (old / "index.json").write_text(json.dumps(index))
    (old / "index.r001.json").write_text("{}")
    store, exact = OfflineStore(old), OfflineStore(env["root"] / "exact")
    assert {f.name for f in old.glob("shard-*")} == set(renamed.values()) and len({r for _, r in renamed}) == 2
    for i in range(NUM_EXAMPLES):
        assert all(torch.equal(v, exact.example(i)[k]) for k, v in store.example(i).items()), i
    dump_hidden_states(env["target"], env["dataset"].select(range(3)), old, manifest=env["manifest"], batch_size=1,
                       progress=False)
    assert sorted(f.name for f in old.iterdir()) == ["index.json", "manifest.json", "run.json",
                                                     "shard-00000.safetensors"]
    assert len(OfflineStore(old)) == 3


def test_cli_refuses_a_vocab_map_of_another_target(env, tmp_path):
    d2t, t2d = draft_vocab(512, 100)
    save_vocab_map(tmp_path / "v.safetensors", d2t - torch.arange(100), t2d)
    with pytest.raises(ValueError, match="vocab of 512 ids.*vocab_size 1024.*eagle-data vocab"):
        main(["dump", "--target", str(env["path"]), "--data", str(env["data"]), "--vocab",
              str(tmp_path / "v.safetensors"), "--out", str(tmp_path / "out"), "--no-progress", "--device", "cpu"])
