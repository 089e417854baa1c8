"""The process decisions every console script shares (app/runtime.py)."""

import sys

import pytest
import torch

from eagle_trainer.app.runtime import pad_id, pick_device, process_group, rank_logs, rank_zero_first


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match=r"--device='tpu' is not one of auto, cpu, cuda, cuda:N"):
        pick_device("tpu", "--device")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="train.device=cuda but no CUDA device is visible; use train.device=cpu"):
            pick_device("cuda")


def test_one_process_has_no_group_and_no_log_files(tmp_path):
    with process_group(torch.device("cpu")) as (rank, world):
        assert (rank, world) == (0, 1) and not torch.distributed.is_initialized()
        assert rank_zero_first(lambda: "built", rank, world) == "built"
        stdout = sys.stdout
        with rank_logs(tmp_path, rank, world):
            assert sys.stdout is stdout
    assert not (tmp_path / "logs").exists()


def test_pad_id():
    class Tokenizer:
        pad_token_id = None

    assert pad_id(Tokenizer()) == 0
    Tokenizer.pad_token_id = 7
    assert pad_id(Tokenizer()) == 7
