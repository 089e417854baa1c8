"""The target embedding in a draft: held as the target's own tensor when shared (train.py), copied otherwise."""

import pytest
import torch
from test_eagle1 import tiny_draft as tiny_eagle1
from test_unroll import tiny_draft as tiny_eagle3


def test_eagle3_holds_the_target_tensor_when_shared():
    draft = tiny_eagle3()
    embedding = torch.randn(50, 32, dtype=torch.float64)
    draft.set_target_weights(embedding, share=True)
    held = draft.embed_tokens.weight
    assert held.data_ptr() == embedding.data_ptr() and not held.requires_grad
    assert "embed_tokens.weight" not in draft.trainable_state_dict()
    assert not any(p is held for p in draft.parameters() if p.requires_grad)
    assert torch.equal(draft.embed_tokens(torch.tensor([3, 7])), embedding[[3, 7]])


@pytest.mark.parametrize("share, dtype", [(False, torch.float64), (True, torch.float32)])  # not asked; CPU dtype differs
def test_eagle3_copies_otherwise(share, dtype):
    draft = tiny_eagle3()
    embedding = torch.randn(50, 32, dtype=dtype)
    draft.set_target_weights(embedding, share=share)
    held = draft.embed_tokens.weight
    assert held.data_ptr() != embedding.data_ptr() and held.dtype == torch.float64
    assert torch.equal(held, embedding.double()) and not held.requires_grad


def test_eagle1_shares_the_embedding_too():
    draft = tiny_eagle1()
    embedding, lm_head = torch.randn(2, *draft.embed_tokens.weight.shape, dtype=torch.float64)
    draft.set_target_weights(embedding, lm_head, share=True)
    assert draft.embed_tokens.weight.data_ptr() == embedding.data_ptr()
    assert draft.target_head.data_ptr() == lm_head.data_ptr()


def test_a_wrong_shape_names_both():
    with pytest.raises(ValueError, match=r"target embedding is \(51, 32\), the draft's is \(50, 32\)"):
        tiny_eagle3().set_target_weights(torch.zeros(51, 32, dtype=torch.float64), share=True)


@pytest.mark.parametrize("make", [tiny_eagle3, tiny_eagle1])
def test_compute_dtype_is_the_trained_weights_not_the_narrower_frozen_ones(make):
    """As the trainer holds a draft on a GPU: frozen weights in bf16 (frozen_weights_to), the trained ones wider.
    A draft frozen whole is cast whole, so it has one dtype."""
    from eagle_trainer.drafts import frozen_weights_to
    draft = make()
    frozen_weights_to(draft, torch.bfloat16)
    assert draft.embed_tokens.weight.dtype == torch.bfloat16
    assert draft.compute_dtype() == torch.float64
    draft.requires_grad_(False)
    frozen_weights_to(draft, torch.bfloat16)
    assert draft.compute_dtype() == torch.bfloat16
