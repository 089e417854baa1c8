"""targets/packed_attention.py: the documents' BlockMask against a dense reference (block tables and token mask),
the attention function against a masked softmax (GQA, odd lengths), every non-packed call left to HF's sdpa, one
BlockMask per forward, the recipe key; on a GPU the memory of a packed forward at N = 32k and the compiled kernel
reused across packed batches."""

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from batches import draft_vocab

from eagle_trainer.config import TargetConfig
from eagle_trainer.data.dataset import collate
from eagle_trainer.targets import packed_attention
from eagle_trainer.targets.frozen import FrozenTarget
from eagle_trainer.targets.loading import load_target
from eagle_trainer.targets.packed_attention import (document_block_mask, packed_attention_forward,
                                                    resolve_packed_attention)
from eagle_trainer.targets.packing import documents
from eagle_trainer.targets.tiny import save_tiny_checkpoint, tiny_qwen3_config

# documents ending inside, at and one past block edges (block sizes 4 and 8), a 1-token one, a long one
LENGTHS = (5, 3, 1, 8, 17, 1, 9)


def cu_seqlens_of(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def dense_mask(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[N, N] bool: query i attends to key j iff j <= i in the same document."""
    n = int(cu_seqlens[-1])
    doc = torch.searchsorted(cu_seqlens[1:], torch.arange(n, dtype=cu_seqlens.dtype), right=True)
    return torch.ones(n, n, dtype=torch.bool).tril() & (doc[:, None] == doc[None, :])


@pytest.mark.parametrize("block_size", [4, 8, 128])
@pytest.mark.parametrize("lengths", [LENGTHS, (40,), (1, 1, 1), (12, 4)])
def test_block_tables_and_mask_mod_match_the_dense_mask(lengths, block_size):
    cu = cu_seqlens_of(lengths)
    n = int(cu[-1])
    mask = dense_mask(cu)
    block_mask = document_block_mask(cu, n, block_size)
    nb = -(-n // block_size)
    padded = torch.zeros(nb * block_size, nb * block_size, dtype=torch.bool)
    padded[:n, :n] = mask
    per_block = padded.view(nb, block_size, nb, block_size).sum((1, 3))  # [nb, nb] allowed pairs per block
    rows = torch.tensor([min(block_size, n - i * block_size) for i in range(nb)])  # real tokens per block
    full = per_block == rows[:, None] * rows[None, :]
    assert torch.equal(block_mask.to_dense()[0, 0].bool(), per_block > 0)  # partial and full blocks listed
    full_listed = torch.zeros(nb, nb, dtype=torch.bool)
    counts, ids = block_mask.full_kv_num_blocks[0, 0], block_mask.full_kv_indices[0, 0]
    for q in range(nb):
        full_listed[q, ids[q, :counts[q]].long()] = True
    assert torch.equal(full_listed, full)
    q_idx, kv_idx = torch.arange(n)[:, None], torch.arange(n)[None, :]
    assert torch.equal(block_mask.mask_mod(0, 0, q_idx, kv_idx), mask)
    assert block_mask.shape == (1, 1, n, n)


class Attention(torch.nn.Module):
    """What HF's attention functions read off the module."""

    def __init__(self, num_heads, num_kv_heads):
        super().__init__()
        self.num_key_value_groups = num_heads // num_kv_heads
        self.is_causal = True


@pytest.mark.parametrize("heads", [(4, 2), (6, 2), (3, 3)])  # GQA of 2, 3 (not a power of two: kv repeated), MHA
def test_packed_attention_forward_matches_masked_softmax(heads):
    num_heads, num_kv_heads = heads
    cu = cu_seqlens_of(LENGTHS)
    n, dh, scale = int(cu[-1]), 16, 0.3
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, num_heads, n, dh, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, num_kv_heads, n, dh, generator=g, dtype=torch.float64) for _ in range(2))
    rep = num_heads // num_kv_heads
    scores = (q @ k.repeat_interleave(rep, 1).transpose(-1, -2)) * scale  # [1, H, N, N]
    ref = scores.masked_fill(~dense_mask(cu), float("-inf")).softmax(-1) @ v.repeat_interleave(rep, 1)
    with documents(cu):
        out, weights = packed_attention_forward(Attention(num_heads, num_kv_heads), q, k, v, None, scaling=scale)
    assert weights is None and out.shape == (1, n, num_heads, dh)
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-10, atol=1e-10)


def test_outside_a_packed_forward_it_is_hf_sdpa():
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 4, 7, 16, generator=g), torch.randn(2, 2, 7, 16, generator=g), torch.randn(2, 2, 7, 16, generator=g)
    mask = torch.ones(2, 1, 7, 7, dtype=torch.bool).tril()
    mask[1, ..., :2] = False  # left padding of row 1
    module = Attention(4, 2)
    for attention_mask in (None, mask):
        ours = packed_attention_forward(module, q, k, v, attention_mask, scaling=0.25)[0]
        hf = sdpa_attention_forward(module, q, k, v, attention_mask, scaling=0.25)[0]
        assert torch.equal(ours, hf)


def test_the_block_mask_is_built_once_per_forward(tiny_qwen3_path, monkeypatch):
    """8 attention layers, one BlockMask per packed forward."""
    built = []

    def counting(cu_seqlens, num_tokens, *args):
        built.append(num_tokens)
        return document_block_mask(cu_seqlens, num_tokens, *args)

    monkeypatch.setattr(packed_attention, "document_block_mask", counting)
    model, _, spec, info = load_target(TargetConfig(path=str(tiny_qwen3_path), dtype="float32",
                                                    packed_attention="flex"), torch.device("cpu"))
    ids, t2d = draft_vocab(info.vocab_size, 64)
    target = FrozenTarget(model, spec, (1, 3), ids, t2d)
    docs = [{"input_ids": list(range(n)), "loss_mask": [True] * n} for n in (6, 9)]
    for _ in range(2):
        target.capture(collate(docs, 0, pack=True), argmax=False)
    target.capture(collate(docs, 0), argmax=False)  # padded: HF's sdpa, no BlockMask
    assert built == [15, 15]
    target.close()


def test_resolve_packed_attention():
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_packed_attention("auto", "sdpa", gpu) == "flex"
    assert resolve_packed_attention("auto", "sdpa", cpu) == "hf"  # eager flex on the CPU: no memory saved
    assert resolve_packed_attention("auto", "eager", gpu) == "hf"
    assert resolve_packed_attention("flex", "sdpa", cpu) == "flex"
    assert resolve_packed_attention("hf", "sdpa", gpu) == "hf"
    with pytest.raises(ValueError, match=r"attn_implementation=sdpa.*packed_attention=hf"):
        resolve_packed_attention("flex", "flash_attention_2", gpu)
    with pytest.raises(ValueError, match=r"packed_attention='blocky' is not one of"):
        resolve_packed_attention("blocky", "sdpa", cpu)


def packed_row(num_docs: int, doc_len: int, vocab_size: int, device):
    g = torch.Generator().manual_seed(num_docs)
    docs = [{"input_ids": torch.randint(0, vocab_size, (doc_len,), generator=g).tolist(),
             "loss_mask": [True] * doc_len} for _ in range(num_docs)]
    return collate(docs, 0, pack=True).to(device)


def forward_peak(target: FrozenTarget, batch) -> int:
    """Bytes allocated at the peak of one capture above what was allocated before it (the weights, the batch)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    states = target.capture(batch, argmax=False)
    torch.cuda.synchronize()
    assert torch.isfinite(states.final_hidden).all()
    return torch.cuda.max_memory_allocated() - before


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["flex", "hf"])
def test_packed_forward_memory_is_linear_at_32k(impl, tmp_path):
    """bf16 forwards of one packed row of N = 32768 tokens (32 documents of 1024) through a small Qwen3 (4 layers,
    hidden 128, 4 query / 2 kv heads of 32). With flex, the peak above the weights stays under a linear budget
    (32 fp32 vectors of the hidden size per token, 512 MiB: every activation one layer holds at once, the kept
    aux/final states and the rotary tables fit in it several times) that is half of one [N, N] bool mask (1 GiB;
    2 GiB as bf16), and halving N about halves it (a quadratic term would quarter it). HF's path (hf), which
    builds that mask, is measured by the same code and must exceed the mask's bytes: the budget catches one."""
    n, doc_len, hidden = 32768, 1024, 128
    config = tiny_qwen3_config(vocab_size=1024, hidden_size=hidden, num_layers=4, max_position_embeddings=doc_len)
    path = save_tiny_checkpoint(tmp_path / "target", config)
    device = torch.device("cuda")
    model, _, spec, info = load_target(TargetConfig(path=str(path), dtype="bfloat16", packed_attention=impl), device)
    assert model.config._attn_implementation == ("eagle_packed" if impl == "flex" else "sdpa")
    ids, t2d = draft_vocab(info.vocab_size, 256)
    target = FrozenTarget(model, spec, (0, 1, 2), ids, t2d)
    full, half = (packed_row(n // doc_len // k, doc_len, info.vocab_size, device) for k in (1, 2))
    assert full.input_ids.shape == (1, n)
    for batch in (half, full):  # compiles flex_attention for both lengths: compilation is not what is measured
        target.capture(batch, argmax=False)
    peak, peak_half = forward_peak(target, full), forward_peak(target, half)
    budget, mask_bytes = n * 32 * 4 * hidden, n * n
    assert budget <= mask_bytes / 2
    print(f"packed_attention={impl}: peak above the weights {peak / 2**20:.0f} MiB at N={n}, "
          f"{peak_half / 2**20:.0f} MiB at N={n // 2} (budget {budget / 2**20:.0f} MiB, one [N, N] bool mask "
          f"{mask_bytes / 2**20:.0f} MiB)")
    if impl == "flex":
        assert peak < budget
        assert peak < 2.5 * peak_half
    else:
        assert peak >= mask_bytes
    target.close()


@pytest.mark.gpu
def test_compiled_flex_is_reused_across_packed_batches(tiny_qwen3_path):
    """Each forward builds a new BlockMask (a new mask_mod closure over new document ids); the compiled
    flex_attention must not recompile for it, nor for every new packed length once a dynamic-length graph
    exists: past torch's recompile limit it would fall back to the eager path, which holds [H, N, N] scores."""
    device = torch.device("cuda")
    model, _, spec, info = load_target(TargetConfig(path=str(tiny_qwen3_path), dtype="bfloat16"), device)
    ids, t2d = draft_vocab(info.vocab_size, 64)
    target = FrozenTarget(model, spec, (1, 3), ids, t2d)
    g = torch.Generator().manual_seed(0)

    def packed(*lengths):
        docs = [{"input_ids": torch.randint(0, info.vocab_size, (n,), generator=g).tolist(), "loss_mask": [True] * n}
                for n in lengths]
        return collate(docs, 0, pack=True).to(device)

    target.capture(packed(300, 217), argmax=False)  # N = 517: compiled
    target.capture(packed(500, 277), argmax=False)  # N = 777: compiled again, with a dynamic length
    with torch._dynamo.config.patch(error_on_recompile=True):
        target.capture(packed(100, 17, 400), argmax=False)  # N = 517 again, other documents
        target.capture(packed(1001), argmax=False)
        target.capture(packed(640, 555, 3), argmax=False)
    target.close()
