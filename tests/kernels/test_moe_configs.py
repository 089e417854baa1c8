"""Tile-config lookup: M buckets, shipped tables, and one config for every M in batch-invariant mode."""

import json
import warnings

import pytest
import torch

from eagle_trainer.kernels.moe import configs
from eagle_trainer.kernels.moe.tune import SHAPES


def test_m_bucket_rounds_the_mean_rows_per_expert_up_to_a_power_of_two():
    assert configs.m_bucket(1, 128) == 16
    assert configs.m_bucket(16384 * 8, 128) == 1024
    assert configs.m_bucket(1000 * 8, 128) == 64  # 62.5 rows per expert
    assert configs.m_bucket(10**9, 128) == 4096


@pytest.mark.parametrize("table", sorted(configs.CONFIG_DIR.glob("*.json")), ids=lambda p: p.stem)
def test_shipped_tables_cover_every_shape_and_bucket(table):
    entries = json.loads(table.read_text())
    for num_experts, _, inter, hidden in SHAPES.values():
        entry = entries[configs.shape_key(num_experts, inter, hidden)]
        assert set(entry["buckets"]) == {str(b) for b in configs.BUCKETS}
        for config in [*entry["buckets"].values(), entry["batch_invariant"]]:
            configs.check_config(config)


def test_shipped_tables_exist_for_h100_and_h200():
    assert {p.stem for p in configs.CONFIG_DIR.glob("*.json")} >= {"NVIDIA_H100_80GB_HBM3", "NVIDIA_H200"}


def test_lookup_picks_bucket_or_the_invariant_entry(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(configs, "device_key", lambda device: "NVIDIA_H100_80GB_HBM3")
    gpu = torch.device("cuda")
    table = configs.load_table("NVIDIA_H100_80GB_HBM3")["E128_I768_H2048"]
    small = configs.get_config(gpu, 128, 768, 2048, 256 * 8, batch_invariant=False)
    large = configs.get_config(gpu, 128, 768, 2048, 65536 * 8, batch_invariant=False)
    assert small == configs.check_config(table["buckets"]["16"])
    assert large == configs.check_config(table["buckets"]["4096"])
    invariant = [configs.get_config(gpu, 128, 768, 2048, n, batch_invariant=True) for n in (8, 8000, 10**6)]
    assert invariant[0] == invariant[1] == invariant[2] == configs.check_config(table["batch_invariant"])
    assert configs.get_config(gpu, 7, 48, 64, 100, batch_invariant=True) == configs.DEFAULT_GPU  # untuned shape
    # an expert-parallel rank's E / ep experts take the entry of the same expert GEMMs (I, H) at the nearest E
    assert configs.get_config(gpu, 32, 768, 2048, 4096, batch_invariant=True) == configs.check_config(
        table["batch_invariant"])
    with pytest.raises(ValueError, match="lacks"):
        configs.check_config({"BM": 64})


def test_an_untuned_device_is_named_once(monkeypatch):
    """A GPU with no tuned table gets the generic tiles, and one warning per shape saying so and how to tune."""
    monkeypatch.setattr(configs, "interpreting", lambda: False)
    monkeypatch.setattr(configs, "device_key", lambda device: "NoSuchGPU")
    configs.warn_untuned.cache_clear()
    with pytest.warns(UserWarning, match=r"no tuned MoE tile config for E8_I64_H64 on NoSuchGPU .*kernels\.moe\.tune"):
        assert configs.get_config(torch.device("cuda"), 8, 64, 64, 100, True) == configs.DEFAULT_GPU
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call of the same shape is silent
        configs.get_config(torch.device("cuda"), 8, 64, 64, 100, True)
