"""The frozen target adapter: real loading path, aux-layer capture, and the teacher over the draft vocab."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from batches import draft_vocab, make_batch

from eagle_trainer import registry
from eagle_trainer.config import TargetConfig
from eagle_trainer.targets.frozen import FrozenTarget, chunked_argmax
from eagle_trainer.targets.loading import load_target


def test_aux_hidden_and_teacher_match_full_forward(tiny_qwen3_path):
    model, tok, spec, info = load_target(TargetConfig(path=str(tiny_qwen3_path)), torch.device("cpu"))
    assert spec is registry.target_spec("Qwen3ForCausalLM") and info.num_layers == 8
    ids, t2d = draft_vocab(info.vocab_size, 300)
    aux_ids = spec.aux_layers(info.num_layers)
    assert aux_ids == (1, 3, 4)
    target = FrozenTarget(model, spec, aux_ids, ids, t2d)
    batch = make_batch(2, 13, info.vocab_size)
    out = target.forward(batch)
    ref = model(batch.input_ids, output_hidden_states=True)
    expect_aux = torch.cat([ref.hidden_states[i + 1] for i in aux_ids], -1)
    torch.testing.assert_close(out.aux_hidden, expect_aux)
    torch.testing.assert_close(out.final_hidden, ref.hidden_states[-1])
    expect_probs = ref.logits[..., ids].float().softmax(-1)
    torch.testing.assert_close(out.teacher_probs(), expect_probs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.teacher_valid, t2d[ref.logits.argmax(-1)])
    assert 0 < out.teacher_valid.float().mean() < 1


class _LargestOutput(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_teacher_never_materialises_full_vocab_logits(tiny_qwen3_path):
    model, _, spec, info = load_target(TargetConfig(path=str(tiny_qwen3_path)), torch.device("cpu"))
    ids, t2d = draft_vocab(info.vocab_size, 64)
    b, t = 2, 40
    target = FrozenTarget(model, spec, (1, 3, 4), ids, t2d, argmax_chunk_elems=b * t * info.vocab_size // 8)
    batch = make_batch(b, t, info.vocab_size)
    with _LargestOutput() as mode:
        target.forward(batch)
    assert mode.largest < b * t * info.vocab_size, mode.largest
    with _LargestOutput() as mode:
        model(batch.input_ids)
    assert mode.largest >= b * t * info.vocab_size  # the check above can fail: a plain forward trips it


@pytest.mark.parametrize("budget", [5, 999, 1 << 26])
def test_chunked_argmax_matches_dense(budget):
    g = torch.Generator().manual_seed(budget)
    h, w = torch.randn(37, 16, generator=g), torch.randn(1001, 16, generator=g)
    assert torch.equal(chunked_argmax(h, w, budget), (h @ w.T).argmax(-1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_chunked_argmax_on_gpu_bf16_matches_dense():
    """The GPU scan (Triton row max per chunk) in bf16, with chunks that split rows and columns and tied maxima."""
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(301, 64, device="cuda", generator=g).bfloat16()
    w = torch.randn(70001, 64, device="cuda", generator=g).bfloat16()
    w[50000] = w[123] = 16 * w[123] / w[123].float().norm()  # equal logits in two column chunks
    h[:5] = w[123]  # rows whose maximum is that tie: the lower id must win
    dense = (h @ w.T).argmax(-1)
    assert (dense[:5] == 123).all()
    for budget in (1 << 20, 1 << 26):
        assert torch.equal(chunked_argmax(h, w, budget), dense)


def test_bad_aux_layer_ids(tiny_qwen3_path):
    model, _, spec, info = load_target(TargetConfig(path=str(tiny_qwen3_path)), torch.device("cpu"))
    ids, t2d = draft_vocab(info.vocab_size, 10)
    with pytest.raises(ValueError, match=r"\[8\]"):
        FrozenTarget(model, spec, (1, 3, 8), ids, t2d)
