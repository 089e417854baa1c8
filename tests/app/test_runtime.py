"""The process decisions every console script shares (app/runtime.py)."""

import sys

import pytest
import torch

from eagle_trainer.app.runtime import (CUDNN_SDPA_ENV, pad_id, pick_device, process_group, rank_logs, rank_zero_first,
                                       sdpa_without_cudnn)


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match=r"--device='tpu' is not one of auto, cpu, cuda, cuda:N"):
        pick_device("tpu", "--device")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="train.device=cuda but no CUDA device is visible; use train.device=cpu"):
            pick_device("cuda")


@pytest.fixture
def cudnn_sdpa_flag():
    """torch's process-wide cuDNN SDPA switch, restored after the test."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    yield
    torch.backends.cuda.enable_cudnn_sdp(before)


def test_sdpa_without_cudnn(cudnn_sdpa_flag, monkeypatch):
    torch.backends.cuda.enable_cudnn_sdp(True)
    pick_device("cpu")  # a CPU command leaves torch's order alone
    assert torch.backends.cuda.cudnn_sdp_enabled()
    monkeypatch.setenv(CUDNN_SDPA_ENV, "1")  # the user's opt-out
    sdpa_without_cudnn()
    assert torch.backends.cuda.cudnn_sdp_enabled()
    monkeypatch.delenv(CUDNN_SDPA_ENV)
    sdpa_without_cudnn()
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()


def test_a_bad_cudnn_setting_is_refused_by_the_command_not_at_import(monkeypatch):
    """EAGLE_CUDNN_SDPA is read when first asked: importing the kernels never fails on it, and every command's
    pick_device refuses a bad value with a message naming the ones it takes (a one-line user error)."""
    from eagle_trainer.kernels.utils import RepeatedShapes
    monkeypatch.setenv(CUDNN_SDPA_ENV, "on")
    shapes = RepeatedShapes(part="draft")  # as the module-level registries are made at import
    with pytest.raises(ValueError, match=r"EAGLE_CUDNN_SDPA='on' is not one of 0, draft, repeated, 1"):
        pick_device("cpu")
    with pytest.raises(ValueError, match="unset it for the default"):
        shapes.repeated("a layout")
    monkeypatch.setenv(CUDNN_SDPA_ENV, "0")
    assert pick_device("cpu") == torch.device("cpu")


@pytest.mark.gpu
def test_a_gpu_command_runs_attention_of_new_lengths_without_cudnn(cudnn_sdpa_flag, monkeypatch):
    """After pick_device('cuda') a causal bf16 attention (a target's, a draft's) of a new length every call, forward
    and backward, runs flash attention and never cuDNN's."""
    monkeypatch.delenv(CUDNN_SDPA_ENV, raising=False)
    torch.backends.cuda.enable_cudnn_sdp(True)
    device = pick_device("cuda")
    assert torch.cuda.current_device() == device.index
    torch.cuda.reset_peak_memory_stats(device)  # CUDA initialised: an explicit index is accepted
    with pytest.raises(ValueError, match=r"--device=cuda:99 is cuda:99 but this process sees \d+ GPU"):
        pick_device("cuda:99", "--device")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for t in (97, 130, 257, 511):
            q, k, v = (torch.randn(1, 8, t, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    ops = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention" in ops, sorted(o for o in ops if "attention" in o)
    assert not [o for o in ops if "cudnn" in o], sorted(o for o in ops if "cudnn" in o)


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
