"""Tile configs of the MoE GEMMs, keyed by (device, E, I, H) and an M bucket.

The M bucket is the mean number of rows an expert receives, S/E with S = T*k pairs, rounded up to a power of
two (clamped to [16, 4096]). Shipped configs live in configs/<device>.json, written by `tune.py`:

    {"E128_I768_H2048": {"buckets": {"16": {...}, ..., "4096": {...}}, "batch_invariant": {...}}}

A config is {"BM", "BN1", "BK1", "W1", "S1", "BN2", "BK2", "W2", "S2", "GM"}: the block of rows shared by
both GEMMs (the sort pads each expert to a multiple of BM), then block N/K, warps and stages of GEMM1
(gate_up + SwiGLU) and GEMM2 (down + routing weight), and the grouped launch order GM.

Batch invariance: which config runs changes the order of the K reduction, so a token's bits could depend
on how many other tokens share its batch. With `batch_invariant=True` one config per shape is used for every
M (the "batch_invariant" entry, tuned at the training shape) and the result of a token is the same whatever
else is in the batch.
"""

from __future__ import annotations

import functools
import json
import re
import warnings
from pathlib import Path

import torch

from eagle_trainer.kernels.utils import interpreting

CONFIG_DIR = Path(__file__).parent / "configs"
KEYS = ("BM", "BN1", "BK1", "W1", "S1", "BN2", "BK2", "W2", "S2", "GM")
# TMA weight loads, warp-specialised K loop; tokens, columns and warps of a top-k sum program
OPTIONAL_KEYS = ("TMA", "WS", "ST", "SH", "SW")
BUCKETS = tuple(2**i for i in range(4, 13))  # 16 .. 4096 rows per expert

DEFAULT_GPU = {"BM": 64, "BN1": 64, "BK1": 64, "W1": 4, "S1": 4, "BN2": 128, "BK2": 64, "W2": 4, "S2": 4, "GM": 8}
DEFAULT_INTERPRET = {"BM": 16, "BN1": 32, "BK1": 32, "W1": 1, "S1": 1, "BN2": 32, "BK2": 32, "W2": 1, "S2": 1,
                     "GM": 1}


def shape_key(num_experts: int, intermediate: int, hidden: int) -> str:
    return f"E{num_experts}_I{intermediate}_H{hidden}"


def device_key(device: torch.device) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name(device)).strip("_")


def m_bucket(num_pairs: int, num_experts: int) -> int:
    mean = max(1, -(-num_pairs // num_experts))
    return next((b for b in BUCKETS if b >= mean), BUCKETS[-1])


@functools.lru_cache(maxsize=None)
def load_table(device_name: str) -> dict:
    path = CONFIG_DIR / f"{device_name}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


@functools.lru_cache(maxsize=None)
def warn_untuned(device_name: str, shape: str) -> None:
    """Say once per (device, shape) that the MoE core runs generic tiles: several times slower than tuned ones."""
    warnings.warn(f"no tuned MoE tile config for {shape} on {device_name} ({CONFIG_DIR / (device_name + '.json')}): "
                  "the MoE core runs generic tiles, which can be several times slower; tune them with "
                  "`python -m eagle_trainer.kernels.moe.tune`", stacklevel=3)


def check_config(config: dict) -> dict:
    missing = [k for k in KEYS if k not in config]
    if missing:
        raise ValueError(f"MoE tile config {config} lacks {missing}")
    return {k: int(config[k]) for k in KEYS + OPTIONAL_KEYS if k in config}


def nearest_entry(table: dict, num_experts: int, intermediate: int, hidden: int) -> dict | None:
    """The entry of this shape; else the one of the same expert GEMMs (I, H) with the nearest expert count. Each
    rank of an expert-parallel run holds E / ep experts of a shape tuned at E: its tiles fit those GEMMs alike."""
    if shape_key(num_experts, intermediate, hidden) in table:
        return table[shape_key(num_experts, intermediate, hidden)]
    same_gemms = [int(k[1:].split("_")[0]) for k in table if k.endswith(f"_I{intermediate}_H{hidden}")]
    if not same_gemms:
        return None
    return table[shape_key(min(same_gemms, key=lambda e: (abs(e - num_experts), e)), intermediate, hidden)]


def get_config(device: torch.device, num_experts: int, intermediate: int, hidden: int, num_pairs: int,
               batch_invariant: bool) -> dict:
    """The tile config for one MoE forward; a shape with no tuned entry gets a generic default."""
    if interpreting() or device.type != "cuda":
        return dict(DEFAULT_INTERPRET)
    name = device_key(device)
    entry = nearest_entry(load_table(name), num_experts, intermediate, hidden)
    if entry is None:
        warn_untuned(name, shape_key(num_experts, intermediate, hidden))
        return dict(DEFAULT_GPU)
    if batch_invariant:
        return check_config(entry["batch_invariant"])
    return check_config(entry["buckets"][str(m_bucket(num_pairs, num_experts))])
