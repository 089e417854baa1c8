"""Triton kernels, forward (and where the draft trains through them, backward), one folder per op.

Every kernels/<op>/ has the same layout: `__init__.py` only re-exports the public names; the Triton
implementation (kernels, launchers that allocate and set the grid, public functions) in files named for what they
hold; `reference.py` the same arithmetic in plain torch, the ground truth of tests/kernels/test_<op>*.py. utils.py
holds what the ops share (interpreter detection, output buffers, dot precision). Imports torch and triton only.

    moe/             the frozen target's MoE forward (router, sort, grouped GEMMs, top-k sum), per-GPU tile configs
    rmsnorm/         a fused RMSNorm forward (plain and zero-centred)
    gdn/             Qwen3-Next's gated delta net forward (conv, gating, chunked delta rule, gated norm)
    soft_ce/         the draft's soft cross-entropy and its gradient per row; teacher row statistics
    ttt_attention/   TTT attention: a library step-0 call merged with the diagonal terms (forward and backward)

Targets bind the first three (targets/moe.py, norms.py, gdn.py); the drafts use the last two (drafts/soft_ce.py,
drafts/attention.py). docs/design.md says which contract each keeps.
"""
