"""MetricsLogger (metrics.jsonl, resume, TensorBoard and wandb sinks) and plot_metrics, without training."""

import json
import struct
import sys

import pytest

from eagle_trainer.config import LogConfig
from eagle_trainer.metrics import MetricsLogger, flatten_record, plot_metrics, read_metrics


def train_record(step, loss):
    return {"split": "train", "step": step, "epoch": 0, "loss": loss, "acc": [0.5, 0.25], "tokens_per_s": 100.0 * step}


ACCEPT = {"split": "accept", "step": 2, "accept_len": {"chain": 1.5, "tree": 2.0},
          "histogram": {"chain": [3, 1], "tree": [2, 2]}}


def test_flatten_record():
    assert flatten_record(train_record(3, 1.25)) == {
        "train/epoch": 0.0, "train/loss": 1.25, "train/acc_0": 0.5, "train/acc_1": 0.25, "train/tokens_per_s": 300.0}
    # dicts of numbers are flattened by name; histograms (dicts of lists) are skipped
    assert flatten_record(ACCEPT) == {"accept/accept_len_chain": 1.5, "accept/accept_len_tree": 2.0}


def test_resume_keeps_records_up_to_the_checkpoint(tmp_path):
    logger = MetricsLogger(tmp_path)
    for step in (1, 2, 3, 4):
        logger.log(train_record(step, loss=10.0 - step))
    logger.log({"split": "eval", "step": 2, "loss": 7.5})  # logged after the step-2 train record, still kept
    logger.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"split": "train", "step": 1, "lo')  # a line cut by a crash mid-write

    resumed = MetricsLogger(tmp_path, resume_step=2)
    kept = [(r["split"], r["step"]) for r in resumed.records]
    assert kept == [("train", 1), ("train", 2), ("eval", 2)]
    assert read_metrics(tmp_path / "metrics.jsonl") == resumed.records
    assert not (tmp_path / "metrics.jsonl.tmp").exists()
    resumed.log(train_record(3, loss=0.5))
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == [(1, 9.0), (2, 8.0), (2, 7.5), (3, 0.5)]
    assert records == resumed.records

    assert MetricsLogger(tmp_path).records == [] and (tmp_path / "metrics.jsonl").read_text() == ""  # fresh run
    assert MetricsLogger(tmp_path / "new", resume_step=5).records == []  # resuming without a metrics file


def test_disabled_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path / "run", enabled=False, log=LogConfig(tensorboard=True, wandb=True))
    logger.log(train_record(1, loss=1.0))
    logger.close()
    assert len(logger.records) == 1 and not (tmp_path / "run").exists()


def test_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(tmp_path, log=LogConfig(tensorboard=True))
    for step in (1, 2, 3):
        logger.log(train_record(step, loss=4.0 - step))
    logger.log(ACCEPT)
    logger.close()
    # resumed from the step-2 checkpoint: the old step-3 point is purged, the new one is logged
    logger = MetricsLogger(tmp_path, log=LogConfig(tensorboard=True), resume_step=2)
    logger.log(train_record(3, loss=0.5))
    logger.close()

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"train/epoch", "train/loss", "train/acc_0", "train/acc_1",
                                             "train/tokens_per_s", "accept/accept_len_chain",
                                             "accept/accept_len_tree"}
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 3.0), (2, 2.0), (3, 0.5)]
    assert [(e.step, e.value) for e in events.Scalars("train/acc_1")] == [(1, 0.25), (2, 0.25), (3, 0.25)]
    assert [(e.step, e.value) for e in events.Scalars("accept/accept_len_tree")] == [(2, 2.0)]


def read_wandb_records(path):
    """The protobuf records of a .wandb file (a LevelDB-style log: 32 KiB blocks of length-prefixed chunks)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, chunks, records = 32768, 7, [], []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])  # crc32, length, full|first|middle|last
        chunks.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            records.append(record)
            chunks = []
    return records


def test_wandb_offline(tmp_path, monkeypatch):
    for name, value in [("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("WANDB_DIR", tmp_path / "env"),
                        ("WANDB_CONFIG_DIR", tmp_path / "config"), ("WANDB_CACHE_DIR", tmp_path / "cache"),
                        ("WANDB_DATA_DIR", tmp_path / "data")]:
        monkeypatch.setenv(name, str(value))
    run_dir = tmp_path / "run"
    logger = MetricsLogger(run_dir, log=LogConfig(wandb=True, wandb_project="test"), run_config={"lr": 0.001})
    run = logger._wandb
    # project and config as the run holds them: a CI run once found no run record in the .wandb log (which
    # wandb-core writes on its own thread), so they are not read back from the file
    assert run.project == "test" and dict(run.config) == {"lr": 0.001}
    logger.log(train_record(1, loss=3.0))
    logger.log(train_record(2, loss=2.0))
    logger.log(ACCEPT)
    logger.close()
    # finish() hands the records to wandb-core, which writes the .wandb log on its own; under load (a CI run with
    # both cores busy) the log was once read back still empty. Shutting the service down, as a process's exit
    # does, waits for it to write everything.
    import wandb
    wandb.teardown()

    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    records = read_wandb_records(run_file)
    kinds = [r.WhichOneof("record_type") for r in records]
    rows = [{item.nested_key[0] if item.nested_key else item.key: json.loads(item.value_json)
             for item in r.history.item} for r in records if r.HasField("history")]
    rows = [{k: v for k, v in row.items() if not k.startswith("_") or k == "_step"} for row in rows]
    assert rows == [
        {"_step": 1, "train/epoch": 0, "train/loss": 3.0, "train/acc_0": 0.5, "train/acc_1": 0.25,
         "train/tokens_per_s": 100.0},
        {"_step": 2, "train/epoch": 0, "train/loss": 2.0, "train/acc_0": 0.5, "train/acc_1": 0.25,
         "train/tokens_per_s": 200.0, "accept/accept_len_chain": 1.5, "accept/accept_len_tree": 2.0},
    ], f"records in the .wandb log: {kinds}"


@pytest.mark.parametrize("option, module", [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")])
def test_missing_package_is_a_clear_error(tmp_path, monkeypatch, option, module):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if the package were not installed
    with pytest.raises(ValueError, match=rf"pip install {option}`, or set log.{option}=false"):
        MetricsLogger(tmp_path, log=LogConfig(**{option: True}))


def test_plots_survive_missing_keys(tmp_path):
    records = [
        {"split": "accept", "step": 0, "accept_len": {"chain": 1.0}},  # tree measured only later
        {"split": "train", "step": 1, "loss": 3.0, "acc": [0.1, 0.0, 0.0], "sim_accept_len": 1.1},  # no tokens/s
        {"split": "train", "step": 2, "loss": 2.0, "acc": [0.3, 0.1], "tokens_per_s": 50.0},  # shorter acc
        {"split": "accept", "step": 2, "accept_len": {"chain": 1.5, "tree": 2.0}},
    ]  # and no eval records
    names = ["loss.png", "accuracy.png", "acceptance.png", "throughput.png"]
    assert plot_metrics(records, tmp_path / "a") == [tmp_path / "a" / n for n in names]
    assert all((tmp_path / "a" / n).stat().st_size > 0 for n in names)
    assert plot_metrics([], tmp_path / "b") == [tmp_path / "b" / n for n in names]
