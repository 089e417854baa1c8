"""Both export formats: read back into the draft that was trained (same logits: fp32 exactly, bf16 closely),
and refused for a checkpoint with a missing or unknown tensor."""

import pytest
import torch
from export_cases import V, edit_checkpoint, rebuilt_logits, tiny_draft

from eagle_trainer.drafts.io import save_draft
from eagle_trainer.export import export_sglang, export_vllm, read_sglang, read_vllm

FORMATS = {"sglang": (export_sglang, read_sglang), "vllm": (export_vllm, read_vllm)}


@pytest.fixture
def checkpoint(tmp_path):
    draft = tiny_draft()
    save_draft(tmp_path / "ckpt", draft)
    return draft, tmp_path / "ckpt"


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_logits_round_trip_float32(checkpoint, tmp_path, fmt):
    draft, ckpt = checkpoint
    export, read = FORMATS[fmt]
    original, rebuilt = rebuilt_logits(draft, read(export(ckpt, tmp_path / "out", dtype=torch.float32)))
    for a, b in zip(original, rebuilt):
        assert torch.equal(b, a)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_logits_round_trip_bfloat16(checkpoint, tmp_path, fmt):
    draft, ckpt = checkpoint
    export, read = FORMATS[fmt]
    original, rebuilt = rebuilt_logits(draft, read(export(ckpt, tmp_path / "out")))
    for a, b in zip(original, rebuilt):
        assert ((b - a).norm() / a.norm()).item() < 1e-2
        assert (b.argmax(-1) == a.argmax(-1)).float().mean().item() > 0.9


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("edit,named", [
    (lambda t: t.pop("midlayer.hidden_norm.weight"), "midlayer.hidden_norm.weight"),
    (lambda t: t.pop("d2t"), "d2t"),
    (lambda t: t.pop("t2d"), "t2d"),
    (lambda t: t.update({"midlayer.self_attn.q_proj.bias": torch.zeros(32)}), "midlayer.self_attn.q_proj.bias"),
    (lambda t: t.update({"embed_tokens.weight": torch.zeros(V, 32)}), "embed_tokens.weight"),
    (lambda t: t.update({"layers.0.input_layernorm.weight": torch.zeros(32)}), "layers.0.input_layernorm.weight"),
])
def test_missing_or_unknown_tensor_is_refused(checkpoint, tmp_path, fmt, edit, named):
    _, ckpt = checkpoint
    edit_checkpoint(ckpt, edit)
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        FORMATS[fmt][0](ckpt, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no out dir, no temp dir left behind
