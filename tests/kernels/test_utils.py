"""The helpers the kernel folders share: interpreter detection, where kernels run, output buffers, dot precision,
the repeated-shape registry."""

import pytest
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


def test_repeated_shapes_answer_true_after_that_many_rounds(monkeypatch):
    shapes = utils.RepeatedShapes(after=2, limit=2, enabled=True)
    x, y = torch.empty(3, 4), torch.empty(4, 3)
    a, b = utils.layout_key(x), utils.layout_key(x.t())  # same shape as y, other strides
    assert b != utils.layout_key(y) and a == utils.layout_key(torch.zeros(3, 4))
    assert [shapes.repeated(k) for k in (a, a, b, a, b, a, b)] == [False, False, False, True, False, True, True]
    c = utils.layout_key(y)
    assert [shapes.repeated(c) for _ in range(4)] == [False] * 4  # past the limit: never counted
    assert not utils.RepeatedShapes(after=0, enabled=False).repeated(a)
    assert utils.RepeatedShapes().after == 32
    for value, parts in ((None, ("draft",)), ("0", ()), ("draft", ("draft",)), ("repeated", ("draft", "target")),
                         ("1", ("draft", "target"))):  # the draft's by default; the target's only with repeated or 1
        if value is None:
            monkeypatch.delenv(utils.CUDNN_SDPA_ENV, raising=False)
        else:
            monkeypatch.setenv(utils.CUDNN_SDPA_ENV, value)
        for part in ("draft", "target"):
            shapes = utils.RepeatedShapes(after=1, part=part)
            assert [shapes.repeated(a), shapes.repeated(a)] == [False, part in parts], (value, part)
            assert utils.cudnn_sdpa_on(part) == (part in parts)
    monkeypatch.setenv(utils.CUDNN_SDPA_ENV, "yes")
    with pytest.raises(ValueError, match="EAGLE_CUDNN_SDPA='yes' is not one of 0, draft, repeated, 1; unset it"):
        utils.cudnn_sdpa_on("draft")
