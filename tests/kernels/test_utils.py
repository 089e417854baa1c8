"""The helpers the kernel folders share: interpreter detection, where kernels run, output buffers, dot precision."""

import torch

from eagle_trainer.kernels import utils


def test_interpreting_reads_the_environment_at_call_time(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert utils.interpreting()
    assert utils.triton_runs_on(torch.device("cpu"))  # interpreted
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not utils.interpreting()
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not utils.interpreting()
    assert not utils.triton_runs_on(torch.device("cpu"))
    assert utils.triton_runs_on(torch.device("cuda"))


def test_new_buffer_takes_like_device_and_dtype_unless_given():
    like = torch.zeros(2, dtype=torch.bfloat16)
    assert utils.new_buffer((3, 4), like).dtype == torch.bfloat16
    out = utils.new_buffer((3, 4), like, torch.int64)
    assert out.shape == (3, 4) and out.dtype == torch.int64 and out.device == like.device


def test_dot_precision_is_full_fp32_for_fp32_only():
    assert utils.dot_precision(torch.float32) == "ieee"
    assert utils.dot_precision(torch.bfloat16) == utils.dot_precision(torch.float16) == "tf32"
