"""EAGLE-1/2 exports (eagle1-sglang, eagle1-vllm): exact tensors and config, same features and logits read back,
refusals (fc bias for vLLM, the other draft kind, missing or unknown tensors), CLI, eval loading."""

import copy
import json
from dataclasses import replace

import pytest
import torch
from export_cases import edit_checkpoint, tiny_draft
from safetensors.torch import load_file, save_file

from eagle_trainer.app.export import main
from eagle_trainer.drafts.eagle1 import Eagle1Config, Eagle1Draft
from eagle_trainer.drafts.llama import KVCache
from eagle_trainer.drafts.unroll import unroll
from eagle_trainer.drafts.io import save_draft
from eagle_trainer import registry
from eagle_trainer.export import (export_eagle1_sglang, export_eagle1_vllm, export_sglang, export_vllm,
                                  read_eagle1)

V, VD, H = 50, 20, 32
FORMATS = {"eagle1-sglang": export_eagle1_sglang, "eagle1-vllm": export_eagle1_vllm}
# the draft classes each engine resolves the export's architectures to (sources in eagle_trainer/export/eagle1.py)
SGLANG_CLASS, VLLM_CLASS = "LlamaForCausalLMEagle", "EagleLlamaForCausalLM"


def tiny_eagle1(fc_bias=True, seed=0, **kw) -> Eagle1Draft:
    cfg = dict(hidden_size=H, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=48, vocab_size=V,
               draft_vocab_size=VD, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=256,
               num_layers=2, fc_bias=fc_bias, target_architecture="Qwen3ForCausalLM")
    cfg.update(kw)
    torch.manual_seed(seed)
    draft = Eagle1Draft(Eagle1Config(**cfg))
    for p in draft.parameters():
        torch.nn.init.normal_(p, std=0.3)
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[torch.arange(0, 2 * VD, 2)] = True  # draft id i -> target id 2i
    draft.set_vocab_map(torch.arange(VD), t2d)
    return draft


def checkpoint(tmp_path, **kw):
    draft = tiny_eagle1(**kw)
    save_draft(tmp_path / "ckpt", draft)
    return draft, tmp_path / "ckpt"


def vllm_class(architectures: list[str]) -> list[str]:
    """vLLM's method "eagle" renaming (transformers_utils/configs/eagle.py EAGLEConfig)."""
    return [a if a.startswith("Eagle") else f"Eagle{a}" for a in architectures]


def predictions(draft: Eagle1Draft, target: tuple[torch.Tensor, torch.Tensor]) -> list[torch.Tensor]:
    """Unrolled features and logits (3 steps), and serving-style KV-cache features, on fixed inputs."""
    draft.set_target_weights(*target)
    torch.manual_seed(1)
    ids, features = torch.randint(0, V, (2, 9)), torch.randn(2, 9, H)
    with torch.no_grad():
        unrolled = unroll(draft, ids, features, 3)
        cache = KVCache(draft)
        cached = [cache.extend(ids[:, :5], features[:, :5], torch.arange(5).expand(2, 5)),
                  cache.extend(ids[:, 5:], features[:, 5:], torch.arange(5, 9).expand(2, 4))]
        return unrolled + [draft.logits(f) for f in unrolled] + cached


@pytest.fixture
def target():
    gen = torch.Generator().manual_seed(7)
    return torch.randn(V, H, generator=gen), torch.randn(V, H, generator=gen)  # embedding, lm_head


def test_writers_are_registered():
    formats = registry.export_formats()
    assert formats["eagle1-sglang"].write is export_eagle1_sglang and formats["eagle1-vllm"].write is export_eagle1_vllm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt,fc_bias", [("eagle1-sglang", True), ("eagle1-sglang", False), ("eagle1-vllm", False)])
def test_tensors_equal_the_checkpoint(tmp_path, fmt, fc_bias, dtype):
    draft, ckpt = checkpoint(tmp_path, fc_bias=fc_bias)
    out = FORMATS[fmt](ckpt, tmp_path / "out", dtype=dtype)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    exported = load_file(str(out / "model.safetensors"))
    layer = [f"self_attn.{p}_proj" for p in "qkvo"] + [f"mlp.{p}_proj" for p in ("gate", "up", "down")]
    names = {"fc.weight", "layers.1.input_layernorm.weight"} | ({"fc.bias"} if fmt == "eagle1-sglang" else set())
    names |= {f"layers.{i}.{m}.weight" for i in range(2) for m in layer + ["post_attention_layernorm"]}
    assert set(exported) == names  # no layers.0.input_layernorm, norm, lm_head, embedding, d2t or t2d
    for name, value in exported.items():
        assert value.dtype == dtype, name
        if name == "fc.bias" and not fc_bias:
            assert torch.equal(value, torch.zeros(H, dtype=dtype))  # SGLang's fc always has a bias
        else:
            assert torch.equal(value, draft.trainable_state_dict()[name].to(dtype)), name


@pytest.mark.parametrize("fmt,fc_bias", [("eagle1-sglang", True), ("eagle1-sglang", False), ("eagle1-vllm", False)])
def test_round_trip_float32_is_exact(tmp_path, target, fmt, fc_bias):
    draft, ckpt = checkpoint(tmp_path, fc_bias=fc_bias)
    rebuilt = read_eagle1(FORMATS[fmt](ckpt, tmp_path / "out", dtype=torch.float32))
    assert rebuilt.config == replace(draft.config, draft_vocab_size=V)  # served over the whole target vocab
    assert torch.equal(rebuilt.d2t, torch.zeros(V, dtype=torch.int64)) and bool(rebuilt.t2d.all())
    original, back = draft.trainable_state_dict(), rebuilt.trainable_state_dict()
    assert set(back) == set(original)
    for name in set(original) - {"d2t", "t2d"}:
        assert torch.equal(back[name], original[name]), name
    for a, b in zip(predictions(draft, target), predictions(rebuilt, target), strict=True):
        assert torch.equal(b, a)


@pytest.mark.parametrize("fmt,fc_bias", [("eagle1-sglang", True), ("eagle1-vllm", False)])
def test_round_trip_bfloat16_is_the_rounded_draft(tmp_path, target, fmt, fc_bias):
    draft, ckpt = checkpoint(tmp_path, fc_bias=fc_bias)
    rebuilt = read_eagle1(FORMATS[fmt](ckpt, tmp_path / "out"))
    rounded = copy.deepcopy(draft)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.bfloat16().float())
    for name, value in rounded.trainable_state_dict().items():
        if name not in ("d2t", "t2d"):
            assert torch.equal(rebuilt.trainable_state_dict()[name], value), name
    for a, b in zip(predictions(rounded, target), predictions(rebuilt, target), strict=True):
        assert torch.equal(b, a)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_config_is_the_llama_config_each_engine_builds(tmp_path, fmt):
    """Both engines build the draft from transformers' LlamaConfig of config.json; vLLM renames the architecture
    (method "eagle") before its registry lookup."""
    from transformers import AutoConfig

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    draft, ckpt = checkpoint(tmp_path, fc_bias=False, rope_scaling=scaling, rope_theta=1e6, algorithm="eagle2")
    out = FORMATS[fmt](ckpt, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    cfg = draft.config
    assert config == {
        "architectures": [SGLANG_CLASS if fmt == "eagle1-sglang" else VLLM_CLASS], "model_type": "llama",
        "hidden_size": H, "intermediate_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "num_hidden_layers": 2, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "rope_scaling": scaling,
        "max_position_embeddings": 256, "vocab_size": V, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "eagle_trainer": {"algorithm": "eagle2", "target_architecture": "Qwen3ForCausalLM",
                          "target": {"fingerprint": None, "vocab_size": V, "aux_layer_ids": []}, "extra": {}},
    }
    if fmt == "eagle1-vllm":
        assert vllm_class(config["architectures"]) == [VLLM_CLASS]
        assert vllm_class([SGLANG_CLASS]) != [VLLM_CLASS]  # why the SGLang name would not load in vLLM
    hf = AutoConfig.from_pretrained(out)
    assert type(hf).__name__ == "LlamaConfig"
    assert (hf.hidden_size, hf.num_hidden_layers, hf.head_dim, hf.num_key_value_heads, hf.vocab_size) == (H, 2, 8, 2, V)
    assert (hf.intermediate_size, hf.rms_norm_eps, hf.tie_word_embeddings) == (48, 1e-6, False)
    rope = getattr(hf, "rope_parameters", None) or {**(hf.rope_scaling or {}), "rope_theta": hf.rope_theta}
    assert rope["rope_theta"] == 1e6 and rope["rope_type"] == "llama3" and rope["factor"] == 8.0
    assert read_eagle1(out).config == replace(cfg, draft_vocab_size=V)


def test_vllm_refuses_a_draft_trained_with_fc_bias(tmp_path):
    _, ckpt = checkpoint(tmp_path, fc_bias=True)
    with pytest.raises(ValueError, match=r"train with `draft\.fc_bias=false` for vLLM"):
        export_eagle1_vllm(ckpt, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_each_kind_is_refused_by_the_other_kinds_formats(tmp_path):
    save_draft(tmp_path / "eagle3", tiny_draft())
    for export in FORMATS.values():
        with pytest.raises(ValueError, match=r"EAGLE-3 draft .* --format sglang\|vllm"):
            export(tmp_path / "eagle3", tmp_path / "out")
    save_draft(tmp_path / "eagle1", tiny_eagle1(fc_bias=False))
    for export in (export_sglang, export_vllm):
        with pytest.raises(ValueError, match=r"EAGLE-1/2 draft .* --format eagle1-sglang\|eagle1-vllm"):
            export(tmp_path / "eagle1", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eagle1", "eagle3"]
    with pytest.raises(ValueError, match=r"not \['LlamaForCausalLMEagle'\] or \['EagleLlamaForCausalLM'\]"):
        read_eagle1(export_sglang(tmp_path / "eagle3", tmp_path / "out"))


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop("layers.1.input_layernorm.weight"), r"missing tensors \['layers\.1\.input_layernorm\.weight'\]"),
    (lambda t: t.pop("d2t"), r"missing tensors \['d2t'\]"),
    (lambda t: t.update({"layers.0.input_layernorm.weight": torch.ones(H)}), r"layers\.0\.input_layernorm\.weight"),
    (lambda t: t.update({"norm.weight": torch.ones(H)}), r"unknown tensors \['norm\.weight'\]"),
    (lambda t: t.update({"lm_head.weight": torch.ones(V, H)}), r"unknown tensors \['lm_head\.weight'\]"),
    (lambda t: t.update({"fc.weight": torch.ones(H, 3 * H)}), r"fc\.weight \(32, 96\) \(config says \(32, 64\)\)"),
])
def test_missing_unknown_or_misshapen_tensor_is_refused(tmp_path, fmt, edit, message):
    _, ckpt = checkpoint(tmp_path, fc_bias=False)
    edit_checkpoint(ckpt, edit)
    with pytest.raises(ValueError, match=message):
        FORMATS[fmt](ckpt, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no out dir, no temp dir left behind


@pytest.mark.parametrize("fmt,name,value", [
    ("eagle1-sglang", "layers.0.input_layernorm.weight", torch.ones(H)),  # SGLang would drop it with a warning
    ("eagle1-vllm", "fc.bias", torch.ones(H)),  # vLLM would raise
])
def test_reader_refuses_a_tensor_the_engine_does_not_load(tmp_path, fmt, name, value):
    _, ckpt = checkpoint(tmp_path, fc_bias=False)
    out = FORMATS[fmt](ckpt, tmp_path / "out")
    tensors = load_file(str(out / "model.safetensors"))
    save_file({**tensors, name: value}, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"unknown tensors \['{name}'\]"):
        read_eagle1(out)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_cli_and_eval_loading(tmp_path, capsys, fmt):
    from eagle_trainer.export import read_draft

    draft, ckpt = checkpoint(tmp_path, fc_bias=False)
    assert main(["--checkpoint", str(ckpt), "--format", fmt, "--out", str(tmp_path / "out"),
                 "--dtype", "float32"]) == 0
    assert f"as {fmt} (float32)" in capsys.readouterr().out
    loaded = read_draft(tmp_path / "out")
    assert isinstance(loaded, Eagle1Draft) and loaded.config == replace(draft.config, draft_vocab_size=V)
    assert torch.equal(loaded.layers[1].self_attn.q_proj.weight, draft.layers[1].self_attn.q_proj.weight)
    with pytest.raises(ValueError, match="--verifier is written only by --format vllm"):
        main(["--checkpoint", str(ckpt), "--format", fmt, "--out", str(tmp_path / "o2"), "--verifier", "x"])
