"""Packed batches through the frozen target: each document captures as it does alone (attention masked per
document by HF from the position_ids, the GDN conv and state restarted per document by our core), and HF's
gated delta net, which cannot restart its state, refuses a packed batch."""

import pytest
import torch

from batches import draft_vocab

from eagle_trainer.config import TargetConfig
from eagle_trainer.data.dataset import collate
from eagle_trainer.targets.frozen import FrozenTarget
from eagle_trainer.targets.loading import load_target
from eagle_trainer.targets.packing import current_documents, documents
from eagle_trainer.targets.tiny import save_tiny_checkpoint, tiny_qwen3_next_config

# the GPU where there is one (our GDN kernels run compiled there, and interpreted on the CPU)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# 70 tokens span two 64-token delta-rule chunks; the 1-token document sits between two others
LENGTHS = (23, 70, 1, 9)


@pytest.fixture(scope="module")
def small_next_path(tmp_path_factory):
    """A smaller Qwen3-Next than the shared fixture (3 gated delta net layers, then full attention; 2 value
    heads), because the interpreted delta-rule kernel costs about a second per 64-token chunk and layer here."""
    config = tiny_qwen3_next_config(vocab_size=512, hidden_size=64, num_layers=4, num_experts=4, top_k=2,
                                    linear_num_key_heads=1, linear_num_value_heads=2)
    return save_tiny_checkpoint(tmp_path_factory.mktemp("small_next"), config, logit_std=6.0)


def examples(vocab_size: int, lengths=LENGTHS, seed=0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab_size, (n,), generator=g).tolist(), "loss_mask": [True] * n}
            for n in lengths]


def check_packed_equals_alone(model, spec, info, aux_ids, lengths=LENGTHS, pad_multiple=1):
    ids, t2d = draft_vocab(info.vocab_size, info.vocab_size // 4)
    target = FrozenTarget(model, spec, aux_ids, ids, t2d)
    docs = examples(info.vocab_size, lengths)
    packed = collate(docs, 0, pack=True).pad_to_multiple(pad_multiple, 0).to(DEVICE)
    both = target.capture(packed, argmax=True)
    assert both.final_hidden.shape[:2] == packed.input_ids.shape
    for doc, start in zip(docs, packed.cu_seqlens.tolist()):
        alone = target.capture(collate([doc], 0).to(DEVICE), argmax=True)
        n = len(doc["input_ids"])
        for name in ("aux_hidden", "final_hidden"):
            torch.testing.assert_close(getattr(both, name)[0, start:start + n], getattr(alone, name)[0],
                                       rtol=1e-5, atol=1e-5, msg=f"{name}, document at {start}")
        assert torch.equal(both.argmax_valid[0, start:start + n], alone.argmax_valid[0])
    target.close()


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
def test_packed_documents_capture_as_alone(arch, tiny_qwen3_path, tiny_qwen3_moe_path):
    """HF builds a causal, same-document mask from the restarting position_ids (no attention mask passed)."""
    path = {"qwen3": tiny_qwen3_path, "qwen3_moe": tiny_qwen3_moe_path}[arch]
    model, _, spec, info = load_target(TargetConfig(path=str(path), dtype="float32"), DEVICE)
    assert model.config._attn_implementation == "sdpa"
    check_packed_equals_alone(model, spec, info, spec.aux_layers(info.num_layers), pad_multiple=16)


def test_packed_documents_capture_as_alone_qwen3_next_triton_gdn(small_next_path):
    """Full-attention layers by HF's document mask; the gated delta net layers by cu_seqlens in our conv and
    delta-rule kernels (the interpreter on the CPU, fp32). The last document starts at token 31 and runs past
    token 64: its chunks start at its own first token."""
    cfg = TargetConfig(path=str(small_next_path), gdn_impl="triton", dtype="float32")
    model, _, spec, info = load_target(cfg, DEVICE)
    layers = model.get_submodule(spec.layers)
    assert [hasattr(layer, "linear_attn") for layer in layers] == [True, True, True, False]
    check_packed_equals_alone(model, spec, info, (0, 2, 3), lengths=(30, 1, 40), pad_multiple=16)


def test_packed_batch_with_hf_gdn_is_refused(small_next_path):
    cfg = TargetConfig(path=str(small_next_path), gdn_impl="hf", dtype="float32")
    model, _, spec, info = load_target(cfg, DEVICE)
    ids, t2d = draft_vocab(info.vocab_size, 64)
    target = FrozenTarget(model, spec, (0, 2, 3), ids, t2d)
    docs = examples(info.vocab_size, (5, 7))
    with pytest.raises(ValueError, match=r"target\.gdn_impl=triton.*data\.pack=false"):
        target.capture(collate(docs, 0, pack=True).to(DEVICE))
    assert current_documents() is None  # the context is left however the forward ends
    target.capture(collate(docs, 0).to(DEVICE))  # padded batches still run HF's forward
    target.close()


def test_documents_context_nests_and_resets():
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    with documents(cu):
        assert current_documents() is cu
        with documents(None):
            assert current_documents() is None
        assert current_documents() is cu
    assert current_documents() is None
