"""Triton kernels, each in kernels/<op>/ beside a plain-torch reference.py (DESIGN section 5).

Imports torch and triton only. moe/: the frozen target's MoE forward (router, sort, grouped GEMMs, top-k sum)
with per-GPU tile configs; rmsnorm/: a fused RMSNorm forward. Targets bind them (targets/moe.py, norms.py).
"""
