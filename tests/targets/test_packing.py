"""Packed batches through the frozen target: each document captures as it does alone (full attention by our
causal, same-document flex attention, packed_attention=flex, or by HF's document mask, hf; the GDN conv and
state restarted per document by our core), no [N, N] mask is built on the flex path, every non-packed call
computes what HF's sdpa computes, and HF's gated delta net, which cannot restart its state, refuses a packed
batch."""

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask
from transformers import AttentionInterface, AttentionMaskInterface, DynamicCache

from batches import draft_vocab

from eagle_trainer.config import TargetConfig
from eagle_trainer.data.dataset import collate
from eagle_trainer.data.regenerate import cache_argument
from eagle_trainer.targets import packed_attention
from eagle_trainer.targets.frozen import FrozenTarget
from eagle_trainer.targets.loading import load_target
from eagle_trainer.targets.packed_attention import NAME, packed_attention_forward
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


@pytest.mark.parametrize("impl", ["flex", "hf"])
@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
def test_packed_documents_capture_as_alone(arch, impl, tiny_qwen3_path, tiny_qwen3_moe_path):
    """flex: our attention function with the documents' BlockMask; hf: HF builds a causal, same-document mask from
    the restarting position_ids (no attention mask passed)."""
    path = {"qwen3": tiny_qwen3_path, "qwen3_moe": tiny_qwen3_moe_path}[arch]
    model, _, spec, info = load_target(TargetConfig(path=str(path), dtype="float32", packed_attention=impl), DEVICE)
    assert model.config._attn_implementation == {"flex": NAME, "hf": "sdpa"}[impl]
    check_packed_equals_alone(model, spec, info, spec.aux_layers(info.num_layers), pad_multiple=16)


def test_long_packed_documents_capture_as_alone(tiny_qwen3_path):
    """Documents over several 128-token blocks, ending inside blocks: on a GPU the compiled kernel reads the
    BlockMask's tables (partial and full blocks); on the CPU the eager path applies its mask_mod."""
    model, _, spec, info = load_target(TargetConfig(path=str(tiny_qwen3_path), dtype="float32",
                                                    packed_attention="flex"), DEVICE)
    assert model.config._attn_implementation == NAME
    check_packed_equals_alone(model, spec, info, (1, 3, 4), lengths=(150, 3, 300, 57, 128), pad_multiple=64)


def raise_if_called(name):
    def builder(*args, **kwargs):
        raise AssertionError(f"{name} ran in a packed forward")
    return builder


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe", "qwen3_next"])
def test_packed_forward_builds_no_quadratic_mask(arch, tiny_qwen3_path, tiny_qwen3_moe_path, small_next_path,
                                                 monkeypatch):
    """With packed_attention=flex no HF mask builder and no sdpa call runs in a packed forward: every attention
    layer gets attention_mask None and runs flex_attention with the documents' BlockMask ([1, 1, N, N] in shape,
    block tables in storage)."""
    path = {"qwen3": tiny_qwen3_path, "qwen3_moe": tiny_qwen3_moe_path, "qwen3_next": small_next_path}[arch]
    cfg = TargetConfig(path=str(path), dtype="float32", gdn_impl="triton", packed_attention="flex")
    model, _, spec, info = load_target(cfg, DEVICE)
    ids, t2d = draft_vocab(info.vocab_size, 64)
    target = FrozenTarget(model, spec, (0, 2), ids, t2d)
    docs = examples(info.vocab_size, (5, 12, 7))
    packed, padded = collate(docs, 0, pack=True).to(DEVICE), collate(docs, 0).to(DEVICE)
    seen, real_flex = [], packed_attention._flex

    def attention(module, query, key, value, attention_mask, **kwargs):
        seen.append(attention_mask)
        return packed_attention_forward(module, query, key, value, attention_mask, **kwargs)

    def flex(device_type):
        def run(query, key, value, block_mask, **kwargs):
            assert isinstance(block_mask, BlockMask) and block_mask.shape == (1, 1, 24, 24)
            seen.append(block_mask)
            return real_flex(device_type)(query, key, value, block_mask=block_mask, **kwargs)
        return run

    monkeypatch.setitem(AttentionInterface._global_mapping, NAME, attention)
    with monkeypatch.context() as m:
        m.setattr(packed_attention, "_flex", flex)
        for name in [k for k in AttentionMaskInterface._global_mapping if k != NAME]:
            m.setitem(AttentionMaskInterface._global_mapping, name, raise_if_called(f"HF's {name} mask"))
        m.setattr(torch.nn.functional, "scaled_dot_product_attention", raise_if_called("sdpa"))
        target.capture(packed, argmax=False)
    num_attention = sum(hasattr(layer, "self_attn") for layer in model.get_submodule(spec.layers))
    masks = [x for x in seen if not isinstance(x, BlockMask)]
    assert masks == [None] * num_attention and len(seen) == 2 * num_attention
    assert len({id(x) for x in seen if isinstance(x, BlockMask)}) == 1  # one BlockMask for the whole forward
    seen.clear()
    target.capture(padded, argmax=False)  # padded batch: HF's sdpa path, no BlockMask
    assert seen == [None] * num_attention
    target.close()


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
def test_non_packed_calls_compute_what_hf_sdpa_computes(arch, tiny_qwen3_path, tiny_qwen3_moe_path):
    """Evaluation's and regeneration's calls (a left-padded 2-D mask, a KV cache, a 4-D tree mask) go to HF's own
    sdpa mask and attention: the logits are bit for bit those of the model loaded with packed_attention=hf."""
    path = {"qwen3": tiny_qwen3_path, "qwen3_moe": tiny_qwen3_moe_path}[arch]
    ours, theirs = (load_target(TargetConfig(path=str(path), dtype="float32", packed_attention=impl), DEVICE)[0]
                    for impl in ("flex", "hf"))
    assert ours.config._attn_implementation == NAME and theirs.config._attn_implementation == "sdpa"
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, ours.config.vocab_size, (2, 9), generator=g).to(DEVICE)
    mask = torch.ones(2, 9, dtype=torch.long, device=DEVICE)
    mask[1, :3] = 0  # row 1 left-padded
    tree = torch.ones(4, 4, dtype=torch.bool, device=DEVICE).tril()
    tree[3, 1:3] = False  # node 3 hangs off node 0: a branch beside nodes 1-2
    results = []
    for model in (ours, theirs):
        cache = {cache_argument(model): DynamicCache(config=model.config), "use_cache": True}
        prefill = model(input_ids=ids, attention_mask=mask, **cache)
        step = model(input_ids=ids[:, :1], attention_mask=torch.cat([mask, mask[:, :1]], 1), **cache)
        verify = model(input_ids=ids[:1, :4], attention_mask=tree[None, None],
                       position_ids=torch.tensor([[0, 1, 2, 1]], device=DEVICE))
        results.append([prefill.logits, step.logits, verify.logits])
    for got, want in zip(*results):
        assert torch.equal(got, want)


@pytest.mark.parametrize("attention, attn_layer_impl", [("hf", "hf"), ("flex", "triton")])
def test_packed_documents_capture_as_alone_qwen3_next_triton_gdn(small_next_path, attention, attn_layer_impl):
    """Full-attention layers by HF's document mask and HF's gated attention, or by flex attention inside our
    attention-layer forward (each document's positions reach our RoPE kernel); the gated delta net layers by
    cu_seqlens in our conv and delta-rule kernels (the interpreter on the CPU, fp32). The last document starts at
    token 31 and runs past token 64: its chunks start at its own first token."""
    cfg = TargetConfig(path=str(small_next_path), gdn_impl="triton", dtype="float32", packed_attention=attention,
                       attn_layer_impl=attn_layer_impl)
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
