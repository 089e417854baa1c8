"""Qwen3-Next targets through HF's modeling code: loading, aux capture, right padding past the gated delta
net layers, the MoE switch, our MoE / zero-centred RMSNorm / GDN cores bound against HF's own path, and the
entry's facts for the real Qwen3-Next-80B-A3B config."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3NextConfig

from batches import draft_vocab, make_batch

from eagle_trainer import registry
from eagle_trainer.config import DemoConfig, TargetConfig
from eagle_trainer.data.regenerate import cache_argument
from eagle_trainer.app.demo import tiny_target_config
from eagle_trainer.targets import bind_qwen3_next
from eagle_trainer.targets.frozen import FrozenTarget
from eagle_trainer.targets.loading import load_target
from eagle_trainer.targets.tiny import save_tiny_checkpoint, tiny_qwen3_next_config
from eagle_trainer.types import Batch

CPU = torch.device("cpu")
# where the Triton cores run: the GPU, else the CPU under the interpreter (conftest sets TRITON_INTERPRET=1)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ARCH = "Qwen3NextForCausalLM"

# config.json of Qwen/Qwen3-Next-80B-A3B-Instruct (token ids and dtype left out)
REAL_80B = dict(
    architectures=[ARCH], decoder_sparse_step=1, full_attention_interval=4, head_dim=256, hidden_act="silu",
    hidden_size=2048, intermediate_size=5120, linear_conv_kernel_dim=4, linear_key_head_dim=128,
    linear_num_key_heads=16, linear_num_value_heads=32, linear_value_head_dim=128, max_position_embeddings=262144,
    mlp_only_layers=[], moe_intermediate_size=512, norm_topk_prob=True, num_attention_heads=16, num_experts=512,
    num_experts_per_tok=10, num_hidden_layers=48, num_key_value_heads=2, partial_rotary_factor=0.25,
    rms_norm_eps=1e-6, rope_scaling=None, rope_theta=10000000, shared_expert_intermediate_size=512,
    tie_word_embeddings=False, vocab_size=151936,
)


@pytest.fixture(scope="module")
def loaded(tiny_qwen3_next_path):
    return load_target(TargetConfig(path=str(tiny_qwen3_next_path)), CPU)


def batch_of(ids: torch.Tensor) -> Batch:
    ones = torch.ones_like(ids, dtype=torch.bool)
    return Batch(ids, ones, ones)


def test_checkpoint_loads_every_tensor(tiny_qwen3_next_path, loaded):
    """save_pretrained writes experts per expert (as the real checkpoint stores them); the loader fuses them and
    refuses any missing or unexpected key, so every tensor here landed on the model."""
    model, _, spec, info = loaded
    saved = load_file(tiny_qwen3_next_path / "model.safetensors")
    assert "model.layers.0.mlp.experts.7.gate_proj.weight" in saved
    assert not any(k.endswith("gate_up_proj") for k in saved)
    assert spec is registry.target_spec(ARCH)
    layers = model.get_submodule(spec.layers)
    assert [hasattr(layer, "self_attn") for layer in layers] == [i % 4 == 3 for i in range(8)]
    assert all(hasattr(layer, "linear_attn") != hasattr(layer, "self_attn") for layer in layers)
    params = dict(model.named_parameters())
    assert torch.equal(params["model.layers.0.linear_attn.A_log"], saved["model.layers.0.linear_attn.A_log"])
    gate_up = params["model.layers.5.mlp.experts.gate_up_proj"][2]
    assert torch.equal(gate_up, torch.cat([saved["model.layers.5.mlp.experts.2.gate_proj.weight"],
                                           saved["model.layers.5.mlp.experts.2.up_proj.weight"]]))
    assert (info.num_layers, info.head_dim, info.num_kv_heads, info.rope_scaling) == (8, 16, 2, None)
    assert (info.num_experts, info.num_experts_per_tok, info.moe_intermediate_size) == (8, 2, 32)


def test_checkpoint_missing_a_linear_attention_tensor_is_refused(tiny_qwen3_next_path, tmp_path):
    """A_log and dt_bias have their own init: left missing they would decay the state silently wrong. The MTP
    head the real checkpoint ships (`mtp.*`) is not part of the model; HF drops it without a complaint."""
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_qwen3_next_path, d)
    state = load_file(d / "model.safetensors")
    state["mtp.fc.weight"] = torch.zeros(64, 128)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    load_target(TargetConfig(path=str(d)), CPU)
    del state["model.layers.4.linear_attn.A_log"]
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing_keys \(1\).*model\.layers\.4\.linear_attn\.A_log"):
        load_target(TargetConfig(path=str(d)), CPU)


def test_real_80b_config_info():
    spec = registry.target_spec(ARCH)
    info = spec.read_info(ARCH, Qwen3NextConfig(**REAL_80B))
    assert (info.hidden_size, info.vocab_size, info.num_layers, info.intermediate_size) == (2048, 151936, 48, 5120)
    assert (info.num_heads, info.num_kv_heads, info.head_dim) == (16, 2, 256)
    assert (info.num_experts, info.num_experts_per_tok, info.moe_intermediate_size) == (512, 10, 512)
    assert (info.rms_norm_eps, info.max_position_embeddings) == (1e-6, 262144)
    # partial_rotary_factor 0.25 rides in rope_parameters with rope_type default, so rope_scaling is None:
    # the draft keeps its own full-head RoPE at the target's theta
    assert (info.rope_theta, info.rope_scaling) == (1e7, None)
    assert spec.aux_layers(info.num_layers) == (1, 23, 44)


def test_aux_hidden_and_teacher_match_full_forward(loaded):
    model, _, spec, info = loaded
    ids, t2d = draft_vocab(info.vocab_size, 300)
    aux_ids = spec.aux_layers(info.num_layers)
    assert aux_ids == (1, 3, 4)  # gated delta net, full attention, gated delta net
    target = FrozenTarget(model, spec, aux_ids, ids, t2d)
    batch = make_batch(2, 13, info.vocab_size)
    out = target.forward(batch)
    ref = model(batch.input_ids, output_hidden_states=True)
    torch.testing.assert_close(out.aux_hidden, torch.cat([ref.hidden_states[i + 1] for i in aux_ids], -1))
    torch.testing.assert_close(out.final_hidden, ref.hidden_states[-1])
    torch.testing.assert_close(out.teacher_probs(), ref.logits[..., ids].float().softmax(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.teacher_valid, t2d[ref.logits.argmax(-1)])
    assert 0 < out.teacher_valid.float().mean() < 1
    target.close()


def test_every_layer_is_causal(loaded):
    """Changing token p changes no layer's output before p (the conv and the delta-rule recurrence look only
    back), and does change it from p on (the check can fail)."""
    model, _, _, info = loaded
    ids = make_batch(1, 70, info.vocab_size, seed=5).input_ids
    changed = ids.clone()
    changed[0, 30] = (ids[0, 30] + 1) % info.vocab_size
    a = model.model(ids, output_hidden_states=True).hidden_states
    b = model.model(changed, output_hidden_states=True).hidden_states
    for layer, (x, y) in enumerate(zip(a, b)):
        torch.testing.assert_close(x[:, :30], y[:, :30], rtol=1e-6, atol=1e-7, msg=f"hidden_states[{layer}]")
        assert not torch.allclose(x[:, 30:], y[:, 30:]), layer


def test_right_padded_row_captures_as_alone(loaded):
    """FrozenTarget passes no attention mask: a right-padded row must capture as it does alone."""
    model, tok, spec, info = loaded
    ids, t2d = draft_vocab(info.vocab_size, 300)
    target = FrozenTarget(model, spec, spec.aux_layers(info.num_layers), ids, t2d)
    short = make_batch(1, 23, info.vocab_size, seed=6).input_ids
    long = make_batch(1, 70, info.vocab_size, seed=7).input_ids  # spans two 64-token delta-rule chunks
    padded = torch.cat([short, short.new_full((1, 47), tok.pad_token_id)], 1)
    both = target.capture(batch_of(torch.cat([padded, long])))
    for row, alone in ((0, target.capture(batch_of(short))), (1, target.capture(batch_of(long)))):
        n = alone.final_hidden.shape[1]
        for name in ("aux_hidden", "final_hidden"):
            torch.testing.assert_close(getattr(both, name)[row, :n], getattr(alone, name)[0], msg=name)
        assert torch.equal(both.argmax_valid[row, :n], alone.argmax_valid[0])
    target.close()


def test_hf_and_grouped_mm_agree(loaded):
    """auto is hf (HF's experts loop) on the CPU (our Triton core on a GPU); grouped_mm is HF's GPU path. Both run
    HF's router."""
    model, _, spec, info = loaded
    assert model.config._experts_implementation == "eager"
    ids, t2d = draft_vocab(info.vocab_size, 200)
    target = FrozenTarget(model, spec, spec.aux_layers(info.num_layers), ids, t2d)
    batch = make_batch(2, 23, info.vocab_size, seed=1)
    hf = target.forward(batch)
    try:
        bound = bind_qwen3_next(model, TargetConfig(path="-", moe_impl="grouped_mm"))
        assert bound == {"moe": "grouped_mm", "norm": "hf", "gdn": "hf", "attn": "hf"}  # auto: HF's code on the CPU
        grouped = target.forward(batch)
    finally:
        bind_qwen3_next(model, TargetConfig(path="-", moe_impl="hf"))
        target.close()
    torch.testing.assert_close(grouped.aux_hidden, hf.aux_hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grouped.teacher_probs(), hf.teacher_probs(), rtol=1e-5, atol=1e-6)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def moe_and_norm_modules(model):
    """The modules moe_impl and norm_impl bind: routers, sparse blocks (their shared expert) and Qwen3NextRMSNorms
    (not the GDN's gated norm)."""
    names = ("Qwen3NextTopKRouter", "Qwen3NextSparseMoeBlock", "Qwen3NextRMSNorm")
    found = [m for m in model.modules() if type(m).__name__ in names]
    assert {type(m).__name__ for m in found} == set(names)
    return found


@pytest.mark.parametrize("gdn_impl", ["hf", "triton"])
def test_moe_and_norm_cores_bound_equal_hf_eager(tiny_qwen3_next_path, gdn_impl):
    """moe_impl=triton (our router, routed experts and the gated shared expert in the core's sum) and norm_impl=triton
    (the zero-centred kernel in every Qwen3NextRMSNorm) give HF eager's backbone hidden states, in fp32 under the
    interpreter (compiled on a GPU); with the GDN core bound too, as well. Binding hf back restores HF's forwards exactly."""
    from eagle_trainer.targets import moe as moe_binding
    cfg = TargetConfig(path=str(tiny_qwen3_next_path), moe_impl="hf", norm_impl="hf", gdn_impl="hf",
                       dtype="float32")
    model, _, _, info = load_target(cfg, DEVICE)
    with torch.no_grad():  # HF initialises the (1 + w) weights to zero: make w matter
        for m in model.modules():
            if type(m).__name__ == "Qwen3NextRMSNorm":
                m.weight.normal_(0.0, 0.2)
    ids = make_batch(2, 45, info.vocab_size, seed=3).input_ids.to(DEVICE)
    ref = model.model(ids, output_hidden_states=True, use_cache=False).hidden_states
    bound = bind_qwen3_next(model, TargetConfig(path="-", moe_impl="triton", norm_impl="triton", gdn_impl=gdn_impl))
    assert bound == {"moe": "triton", "norm": "triton", "gdn": gdn_impl, "attn": "hf"}
    assert model.config._experts_implementation == moe_binding.TRITON_NAME
    assert all("forward" in r.__dict__ for r in moe_binding._routers(model))
    layers = model.model.layers
    for norm in (model.model.norm, layers[0].input_layernorm, layers[0].post_attention_layernorm,
                 layers[3].self_attn.q_norm, layers[3].self_attn.k_norm):
        assert "forward" in norm.__dict__
    # the sparse block runs ours (the shared expert's weights go to the core; its modules are not called); the
    # GDN's gated norm is the GDN binding's business
    assert all("forward" in layer.mlp.__dict__ for layer in layers)
    assert not any("forward" in m.__dict__ for m in (layers[0].mlp.shared_expert, layers[0].mlp.shared_expert_gate,
                                                     layers[0].linear_attn.norm))
    out = model.model(ids, output_hidden_states=True, use_cache=False).hidden_states
    tol = 1e-5 if gdn_impl == "hf" else 1e-4  # the GDN core's chunked sums run in another order than HF's
    for i, (a, b) in enumerate(zip(out, ref, strict=True)):
        assert rel_err(a, b) < tol, (i, rel_err(a, b))
    assert bind_qwen3_next(model, cfg) == {"moe": "hf", "norm": "hf", "gdn": "hf", "attn": "hf"}
    assert model.config._experts_implementation == "eager"
    assert not any("forward" in m.__dict__ for m in moe_and_norm_modules(model))
    for a, b in zip(model.model(ids, output_hidden_states=True, use_cache=False).hidden_states, ref, strict=True):
        assert torch.equal(a, b)


def odd_sparse_model(dtype=torch.float32, device=DEVICE, **sizes):
    """A one-layer Qwen3NextForCausalLM built in memory with odd MoE sizes (the routed and shared intermediate sizes
    differ), weights N(0, std), so that the shared expert's gate is far from 1/2."""
    from transformers import Qwen3NextForCausalLM
    from eagle_trainer.targets.tiny import tiny_qwen3_next_config
    std = sizes.pop("std", 0.1)
    config = tiny_qwen3_next_config(vocab_size=64, **{"hidden_size": 72, "num_layers": 1, "num_experts": 6,
                                                      "top_k": 2, "moe_intermediate_size": 40,
                                                      "shared_expert_intermediate_size": 56, **sizes})
    torch.manual_seed(0)
    model = Qwen3NextForCausalLM(config).eval().requires_grad_(False)
    for p in model.model.layers[0].mlp.parameters():
        p.normal_(0.0, std)
    return model.to(device, dtype)


def test_shared_expert_block_bound_equals_hf_eager_and_the_reference():
    """One sparse block at odd sizes, fp32: our block forward (router, shared expert, routed experts, one fp32 sum)
    gives HF eager's output and the fp64 block reference's; the shared expert's weights are read at every call, so a
    parameter replaced by a new tensor (as a sharded target's gathers give) is what the next call uses."""
    from torch import nn
    from eagle_trainer.kernels.moe import SharedExpert
    from eagle_trainer.kernels.moe.reference import moe_block_reference
    model = odd_sparse_model()
    block = model.model.layers[0].mlp
    x = torch.randn(2, 37, 72, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ref = block(x)

    def reference():
        mlp = block.shared_expert
        shared = SharedExpert(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight,
                              block.shared_expert_gate.weight)
        return moe_block_reference(x.view(-1, 72), block.gate.weight, block.experts.gate_up_proj,
                                   block.experts.down_proj, 2, True, shared=shared).view(x.shape)

    gate = torch.sigmoid(block.shared_expert_gate(x))
    assert 0.05 < gate.std().item() and rel_err(block.shared_expert(x) * gate, ref) > 0.1  # both terms matter
    assert bind_qwen3_next(model, TargetConfig(path="-", moe_impl="triton"))["moe"] == "triton"
    out = block(x)
    assert rel_err(out, ref) < 1e-5 and rel_err(out, reference()) < 1e-5
    block.shared_expert.up_proj.weight = nn.Parameter(torch.randn_like(block.shared_expert.up_proj.weight) * 0.1,
                                                      requires_grad=False)
    with torch.no_grad():
        block.shared_expert_gate.weight.neg_()
    new = block(x)
    assert rel_err(new, out) > 1e-2 and rel_err(new, reference()) < 1e-5
    bind_qwen3_next(model, TargetConfig(path="-", moe_impl="hf"))
    assert "forward" not in block.__dict__ and rel_err(block(x), new) < 1e-5


@pytest.mark.parametrize("option", ["moe_impl", "norm_impl", "gdn_impl", "attn_layer_impl"])
def test_triton_off_the_gpu_needs_the_interpreter(loaded, option, monkeypatch):
    """triton is served (no longer refused for Qwen3-Next), but on the CPU only under TRITON_INTERPRET=1."""
    model = loaded[0]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=f"{option}=triton needs a CUDA device.*TRITON_INTERPRET=1"):
        bind_qwen3_next(model, TargetConfig(path="-", **{option: "triton"}))
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.gpu
def test_moe_and_norm_cores_bound_in_bf16_on_gpu_track_the_fp32_truth(tiny_qwen3_next_path):
    """On the GPU in bf16, our MoE core and zero-centred norms (auto) capture states about as close to HF's fp32
    result as HF's own bf16 path (grouped_mm, HF norms) does."""
    dev = torch.device("cuda")

    def capture(moe_impl, norm_impl, dtype):
        model, _, spec, info = load_target(TargetConfig(path=str(tiny_qwen3_next_path), moe_impl=moe_impl,
                                                        norm_impl=norm_impl, dtype=dtype), dev)
        ids, t2d = draft_vocab(info.vocab_size, 200)
        batch = make_batch(2, 300, info.vocab_size).to(dev)
        return FrozenTarget(model, spec, spec.aux_layers(info.num_layers), ids, t2d).capture(batch).final_hidden.float()

    truth = capture("hf", "hf", "float32")  # (the attention layers and the GDN: auto, ours on the GPU, in all three)
    ours, theirs = capture("auto", "auto", "bfloat16"), capture("grouped_mm", "hf", "bfloat16")
    err = lambda x: float((x - truth).norm() / truth.norm())
    assert err(ours) <= 1.5 * err(theirs) + 1e-3, (err(ours), err(theirs))


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_real_shape_block_in_bf16_is_no_further_from_the_truth_than_hf():
    """Qwen3-Next-80B-A3B's sparse block (H 2048, 512 experts, top-10, I 512, shared I 512; weights N(0, 0.02)) on
    2999 tokens in bf16: our block (router, shared expert, routed experts, one fp32 sum) is no further from the
    truth than HF's bf16 eager block. The truth for that is the fp64 block on the same bf16 weights with the
    experts chosen from bf16 logits, as both bf16 paths choose them (with 512 near-uniform logits a near-tie may
    flip either way against fp32 logits, which would judge the flips, not the arithmetic); against HF's fp32
    block ours is within 1.5x of HF's bf16 error."""
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextSparseMoeBlock
    from eagle_trainer.kernels.moe import SharedExpert, moe_forward
    from eagle_trainer.kernels.moe.reference import moe_block_reference
    dev = torch.device("cuda")
    config = Qwen3NextConfig(**REAL_80B)
    config._experts_implementation = "eager"
    torch.manual_seed(0)
    with dev:
        block32 = Qwen3NextSparseMoeBlock(config)
        for p in block32.parameters():
            p.normal_(0.0, 0.02)
        x = torch.randn(1, 2999, 2048, dtype=torch.bfloat16)
    block = Qwen3NextSparseMoeBlock(config).to(dev, torch.bfloat16)
    block.load_state_dict({k: v.to(torch.bfloat16) for k, v in block32.state_dict().items()})
    block32.load_state_dict({k: v.float() for k, v in block.state_dict().items()})  # the same (bf16) values
    hf = block(x)[0]
    fp32_truth = block32(x.float())[0]
    mlp = block.shared_expert
    shared = SharedExpert(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight,
                          block.shared_expert_gate.weight)
    args = (block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj, 10, True)
    ours = moe_forward(x[0], *args, shared=shared)
    truth = moe_block_reference(x[0], *args, shared=shared)
    assert rel_err(ours, truth) <= rel_err(hf, truth), (rel_err(ours, truth), rel_err(hf, truth))
    assert rel_err(ours, fp32_truth) <= 1.5 * rel_err(hf, fp32_truth) + 1e-3


def test_registry_entry_and_demo_config():
    target = registry.resolve(ARCH, "eagle3").target
    assert target.experts == "mlp.experts" and target.bind_kernels is bind_qwen3_next
    assert (target.layers, target.embed, target.final_norm, target.lm_head) == (
        "model.layers", "model.embed_tokens", "model.norm", "lm_head")
    config = tiny_target_config(DemoConfig(architecture="qwen3_next"))
    assert isinstance(config, Qwen3NextConfig) and config.hidden_size == DemoConfig.hidden_size
    assert config.layer_types.count("full_attention") == DemoConfig.num_layers // 4
    assert config.rope_parameters["partial_rotary_factor"] == 0.25


def test_fused_expert_layout_loads_the_same_model(loaded, tmp_path):
    config = tiny_qwen3_next_config(vocab_size=1024, hidden_size=64, num_layers=8, num_experts=8, top_k=2)
    path = save_tiny_checkpoint(tmp_path / "fused", config, logit_std=6.0, expert_layout="fused")
    assert "model.layers.0.mlp.experts.gate_up_proj" in load_file(path / "model.safetensors")
    fused = load_target(TargetConfig(path=str(path)), CPU)[0]
    for (name, a), (_, b) in zip(loaded[0].named_parameters(), fused.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_gdn_core_bound_equals_hf_path(tiny_qwen3_next_path):
    """gdn_impl=triton (the Triton GDN core, fp32: compiled on a GPU, interpreted on the CPU) captures what HF's torch path does;
    a cached (decoding) call still goes through HF's forward."""
    from eagle_trainer.targets.gdn import LINEAR_ATTENTION_CLASS, projection_layout
    kinds = {"moe_impl": "hf", "norm_impl": "hf", "dtype": "float32"}  # only the GDN differs
    ref_model, _, spec, info = load_target(TargetConfig(path=str(tiny_qwen3_next_path), gdn_impl="hf", **kinds),
                                           DEVICE)
    model, _, _, _ = load_target(TargetConfig(path=str(tiny_qwen3_next_path), gdn_impl="triton", **kinds), DEVICE)
    gdn = [m for m in model.modules() if type(m).__name__ == LINEAR_ATTENTION_CLASS]
    assert gdn and all("forward" in m.__dict__ for m in gdn)
    assert all(projection_layout(m, DEVICE) is not None for m in gdn)  # the copy-free path runs
    assert not any("forward" in m.__dict__ for m in ref_model.modules() if type(m).__name__ == LINEAR_ATTENTION_CLASS)
    ids, t2d = draft_vocab(info.vocab_size, 200)
    aux_ids = spec.aux_layers(info.num_layers)
    batch = make_batch(2, 70, info.vocab_size).to(DEVICE)  # more than one 64-token chunk
    ours = FrozenTarget(model, spec, aux_ids, ids, t2d).capture(batch, argmax=True)
    ref = FrozenTarget(ref_model, spec, aux_ids, ids, t2d).capture(batch, argmax=True)
    torch.testing.assert_close(ours.aux_hidden, ref.aux_hidden, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.final_hidden, ref.final_hidden, rtol=1e-4, atol=1e-4)
    # incremental decoding with a cache takes HF's path (whichever name this transformers gives the cache): the same
    # logits as the reference model for the prefill and for the tokens decoded from the states it left in the cache
    from transformers import DynamicCache
    caches = {m: DynamicCache(config=m.config) for m in (model, ref_model)}
    for start, end in ((0, 5), (5, 6), (6, 8)):
        out, expect = (m(batch.input_ids[:1, start:end], **{cache_argument(m): caches[m]}, use_cache=True)
                       for m in (model, ref_model))
        torch.testing.assert_close(out.logits, expect.logits)


def test_attention_layers_bound_equal_hf(tiny_qwen3_next_path):
    """attn_layer_impl=triton (q/k norm + partial RoPE and the output gate in our kernels, fp32: compiled on a GPU,
    interpreted on the CPU) captures what HF's gated attention does, for a right-padded batch; a cached (decoding)
    call still goes through HF's forward. Only the attention layers differ."""
    kinds = {"moe_impl": "hf", "norm_impl": "hf", "gdn_impl": "hf", "dtype": "float32"}
    models = {impl: load_target(TargetConfig(path=str(tiny_qwen3_next_path), attn_layer_impl=impl, **kinds), DEVICE)
              for impl in ("hf", "triton")}
    ref_model, _, spec, info = models["hf"]
    model = models["triton"][0]
    with torch.no_grad():  # HF initialises the norms' (1 + w) weights to zero: make w matter, alike in both
        for m in (ref_model, model):
            torch.manual_seed(0)
            for layer in m.get_submodule(spec.layers):
                if hasattr(layer, "self_attn"):
                    layer.self_attn.q_norm.weight.normal_(0.0, 0.3)
                    layer.self_attn.k_norm.weight.normal_(0.0, 0.3)
    attention = [m for m in model.modules() if type(m).__name__ == "Qwen3NextAttention"]
    assert len(attention) == 2 and all("forward" in m.__dict__ for m in attention)
    assert not any("forward" in m.__dict__ for m in ref_model.modules() if type(m).__name__ == "Qwen3NextAttention")
    ids, t2d = draft_vocab(info.vocab_size, 200)
    aux_ids = spec.aux_layers(info.num_layers)
    batch = make_batch(2, 37, info.vocab_size, seed=4).to(DEVICE)
    ours = FrozenTarget(model, spec, aux_ids, ids, t2d).capture(batch, argmax=True)
    ref = FrozenTarget(ref_model, spec, aux_ids, ids, t2d).capture(batch, argmax=True)
    torch.testing.assert_close(ours.aux_hidden, ref.aux_hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.final_hidden, ref.final_hidden, rtol=1e-5, atol=1e-5)
    from transformers import DynamicCache
    caches = {m: DynamicCache(config=m.config) for m in (model, ref_model)}
    for start, end in ((0, 5), (5, 6)):
        out, expect = (m(batch.input_ids[:1, start:end], **{cache_argument(m): caches[m]}, use_cache=True)
                       for m in (model, ref_model))
        assert torch.equal(out.logits, expect.logits)


@pytest.mark.gpu
def test_bound_attention_takes_cudnn_for_a_repeated_layout(tiny_qwen3_next_path, monkeypatch):
    """bf16 on a GPU: the bound attention's first forward at a layout runs without cuDNN (eagle-train's SDPA
    setting), the next puts cuDNN first (after=1 here; 32 by default); both capture what HF's forward does, within
    bf16."""
    from eagle_trainer.app.runtime import sdpa_without_cudnn
    from eagle_trainer.kernels.utils import RepeatedShapes
    from eagle_trainer.targets import attention_layer

    sdpa_without_cudnn()
    monkeypatch.setattr(attention_layer, "CUDNN_SHAPES", RepeatedShapes(after=1, enabled=True))
    kinds = {"moe_impl": "hf", "norm_impl": "hf", "gdn_impl": "hf", "dtype": "bfloat16"}
    model, _, spec, info = load_target(TargetConfig(path=str(tiny_qwen3_next_path), attn_layer_impl="triton",
                                                    **kinds), torch.device("cuda"))
    ref = load_target(TargetConfig(path=str(tiny_qwen3_next_path), attn_layer_impl="hf", **kinds),
                      torch.device("cuda"))[0]
    ids, t2d = draft_vocab(info.vocab_size, 200)
    aux_ids = spec.aux_layers(info.num_layers)
    batch = make_batch(1, 301, info.vocab_size, seed=5).to("cuda")  # the backbone gets no mask: causal sdpa
    want = FrozenTarget(ref, spec, aux_ids, ids, t2d).capture(batch)
    target = FrozenTarget(model, spec, aux_ids, ids, t2d)
    kernels = []
    for _ in range(2):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            got = target.capture(batch)
            torch.cuda.synchronize()
        kernels.append(any("cudnn" in e.name.lower() and "sdpa" in e.name.lower() for e in prof.events()))
        err = float((got.aux_hidden.float() - want.aux_hidden.float()).norm() / want.aux_hidden.float().norm())
        assert err < 1e-2, err
    assert kernels == [False, True]  # a cuDNN attention kernel ran in the second forward only


@pytest.mark.parametrize("key_dim,value_dim,layout", [(16, 32, True), (32, 16, True), (12, 20, False)])
def test_projection_layout_reads_what_hf_splits(key_dim, value_dim, layout):
    """The conv channels, z, b and a that HF's fix_query_key_value_ordering makes of the two projections are where
    ProjectionLayout says; heads of 12 make runs shorter than 16, so no layout (HF's method and copies then)."""
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

    from eagle_trainer.targets.gdn import projection_layout
    config = tiny_qwen3_next_config(vocab_size=64, hidden_size=40, linear_num_key_heads=2, linear_num_value_heads=6,
                                    linear_key_head_dim=key_dim, linear_value_head_dim=value_dim)
    module = Qwen3NextGatedDeltaNet(config, layer_idx=0)
    found = projection_layout(module, torch.device("cpu"))
    assert (found is not None) == layout
    if not layout:
        return
    assert found.conv_align == 16 and not bool((found.conv_starts % 16).any())  # heads of 16 and 32: 16-aligned
    g = torch.Generator().manual_seed(0)
    qkvz = torch.randn(2, 3, module.in_proj_qkvz.out_features, generator=g)
    ba = torch.randn(2, 3, module.in_proj_ba.out_features, generator=g)
    query, key, value, z, b, a = module.fix_query_key_value_ordering(qkvz, ba)
    conv_in = torch.cat([x.reshape(2, 3, -1) for x in (query, key, value)], dim=-1)
    run = conv_in.shape[-1] // found.conv_starts.numel()
    columns = (found.conv_starts[:, None].long() + torch.arange(run)).reshape(-1)
    assert torch.equal(qkvz[..., columns], conv_in)
    assert torch.equal(found.gate(qkvz).reshape(z.shape), z)
    assert torch.equal(ba[..., found.beta_columns], b) and torch.equal(ba[..., found.a_columns], a)


def test_projection_layout_of_the_real_80b_layer():
    """The real model's linear attention (16 key heads, 32 value heads, dims 128) takes the copy-free path: runs of
    128 columns, 16-aligned (the weights are never read: built on the meta device)."""
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

    from eagle_trainer.targets.gdn import projection_layout
    with torch.device("meta"):
        module = Qwen3NextGatedDeltaNet(Qwen3NextConfig(**REAL_80B), layer_idx=0)
    found = projection_layout(module, torch.device("cpu"))
    assert found is not None and found.conv_align == 16
    assert found.conv_starts.numel() == module.conv_dim // 128 == 64
    assert found.gate_shape == (16, 2, 128) and found.gate_strides == (768, 128)


def test_tree_decoding_on_the_gdn_core_equals_hf_ops_and_the_reference(tiny_qwen3_next_path):
    """A module bound to our GDN core decodes a draft tree with our kernels (g/beta gating, the tree rule that
    normalises q and k itself, the gated norm; interpreted on the CPU): the same logits and features as HF's ops
    with the rule's torch reference, through a prefill, a tree, the acceptance of one path and the next tree."""
    from eagle_trainer.evaluate.speculative import TargetCache, Tree
    kinds = {"moe_impl": "hf", "norm_impl": "hf", "dtype": "float32"}  # only the GDN differs
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 1024, (21,), generator=gen).to(DEVICE)
    first = Tree(tokens=torch.randint(0, 1024, (6,), generator=gen).to(DEVICE), parents=[-1, -1, 0, 0, 2, 4],
                 depths=[1, 1, 2, 2, 3, 4])
    second = Tree(tokens=torch.randint(0, 1024, (4,), generator=gen).to(DEVICE), parents=[-1, 0, 0, 1],
                  depths=[1, 2, 2, 3])
    sides = {}
    for impl in ("hf", "triton"):
        model, _, spec, info = load_target(TargetConfig(path=str(tiny_qwen3_next_path), gdn_impl=impl, **kinds),
                                           DEVICE)
        target = TargetCache(model, spec, tuple(spec.aux_layers(info.num_layers)), lambda s: s.aux_hidden)
        try:
            assert target.recurrent.kernels == [impl == "triton"] * 6
            outs = [target.forward(prompt, torch.arange(21, device=DEVICE), last_logits_only=True)]
            committed = 21
            for tree, rows in ((first, [0, 1, 3, 5]), (second, [0, 2])):  # root, nodes 0, 2, 4; then root, node 1
                ids = torch.cat([prompt[-1:], tree.tokens])
                positions = torch.tensor([committed] + [committed + d for d in tree.depths], device=DEVICE)
                outs.append(target.forward(ids, positions, tree))
                target.keep(rows, DEVICE)
                committed += len(rows)
        finally:
            target.close()
        sides[impl] = outs
    for (logits, feats), (ref_logits, ref_feats) in zip(sides["triton"], sides["hf"]):
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(feats, ref_feats, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_gdn_core_bound_in_bf16_on_gpu_tracks_the_fp32_truth(tiny_qwen3_next_path):
    """On the GPU in bf16, the captured states and the teacher with our GDN core are about as close to HF's fp32
    result as HF's own bf16 torch path is (norm-relative error at most 2x HF's, plus a small floor). The MoE, the
    norms and the attention layers stay HF's in all three runs, so only the GDN differs."""
    dev = torch.device("cuda")

    def forward(impl, dtype):
        model, _, spec, info = load_target(TargetConfig(path=str(tiny_qwen3_next_path), gdn_impl=impl, dtype=dtype,
                                                        moe_impl="hf" if dtype == "float32" else "grouped_mm",
                                                        norm_impl="hf", attn_layer_impl="hf"), dev)
        ids, t2d = draft_vocab(info.vocab_size, 200)
        batch = make_batch(2, 300, info.vocab_size).to(dev)
        out = FrozenTarget(model, spec, spec.aux_layers(info.num_layers), ids, t2d).forward(batch)
        return out.aux_hidden.float(), out.final_hidden.float(), out.teacher_probs()

    truth = forward("hf", "float32")
    ours, theirs = forward("triton", "bfloat16"), forward("hf", "bfloat16")
    for i, name in enumerate(("aux_hidden", "final_hidden", "teacher_probs")):
        err = lambda x: float((x[i] - truth[i]).norm() / truth[i].norm())  # noqa: B023
        assert err(ours) <= 2 * err(theirs) + 1e-3, (name, err(ours), err(theirs))


def test_eagle3_demo_on_qwen3_next_learns_and_exports(demo_next_run):
    """EAGLE-3 trained on the tiny Qwen3-Next demo target (CPU, HF's GDN code) learns, gets real acceptance
    measured (token-by-token verification) and exports as a plain LlamaForCausalLMEagle3 draft."""
    import json
    run_dir, summary = demo_next_run
    before, after = summary.eval_before, summary.eval_after
    assert after["acc"][0] > before["acc"][0] + 0.2 and after["loss"] < 0.8 * before["loss"], (before, after)
    assert set(summary.accept_after) == {"chain", "tree"}
    exported = json.loads((run_dir / "export/sglang/config.json").read_text())
    target = json.loads((run_dir / "target/config.json").read_text())
    assert exported["architectures"] == ["LlamaForCausalLMEagle3"]
    # the target's attention shape and rope_theta; full rotary (the engines' Llama layer has no partial rotary)
    assert exported["head_dim"] == target["head_dim"]
    assert exported["rope_theta"] == target["rope_parameters"]["rope_theta"] and exported["rope_scaling"] is None
    assert exported["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 3, 4]
