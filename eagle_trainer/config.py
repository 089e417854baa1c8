"""Structured-config schemas for the hydra recipes in eagle_trainer/recipes/ (one dataclass per YAML group).

Only app/train.py turns the composed OmegaConf object into these dataclasses; the library receives them
typed. Unknown keys fail at compose time because every group is backed by a schema here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING


@dataclass
class TargetConfig:
    # HF checkpoint directory (config.json, *.safetensors, tokenizer), or a Hugging Face Hub id org/name[@revision]
    # (its config, tokenizer and top-level safetensors fetched into the HF cache; HF_HUB_OFFLINE=1: the cache alone)
    path: str = MISSING
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU; or float32 / bfloat16 / float16
    trust_remote_code: bool = False
    aux_layer_ids: Optional[list[int]] = None  # 0-based decoder-layer outputs; None: [1, L//2-1, L-4]
    attn_implementation: str = "sdpa"
    # full attention of packed batches (data.pack): auto | flex | hf; auto = flex on a GPU (causal, same-document flex
    # attention, memory linear in the packed length; needs attn_implementation=sdpa), else hf (HF's [N, N] mask)
    packed_attention: str = "auto"
    # MoE targets only (ignored for dense ones): auto | triton | hf | grouped_mm; auto = triton on GPU, hf on CPU
    moe_impl: str = "auto"
    moe_batch_invariant: bool = True  # triton: a token's routing and expert output do not depend on the rest of the batch
    # MoE targets (Qwen3-MoE, Qwen3-Next: zero-centred): RMSNorm as auto | triton | hf; auto = triton on GPU, hf on CPU
    norm_impl: str = "auto"
    # Qwen3-Next linear attention (our GDN core or HF's): auto | triton | hf; auto = triton on GPU, hf on CPU
    gdn_impl: str = "auto"
    # Qwen3-Next full attention: q/k norm + RoPE and the output gate in our kernels, or HF's ops: auto | triton | hf
    attn_layer_impl: str = "auto"


@dataclass
class DraftConfig:
    algorithm: str = "eagle3"  # eagle3 | eagle1 | eagle2 (= eagle1 training, tree decoding at serve time)
    num_layers: int = 1
    draft_vocab_size: int = 32000
    ttt_steps: int = 7  # K: training-time-test unroll length
    step_weight: float = 0.8  # loss weight of step k is step_weight**k
    mask_teacher_argmax: bool = True  # drop positions whose full-vocab target argmax is outside the draft vocab
    attention: str = "auto"  # naive (materialises [T,T]; reference), flex or fused (O(T) memory; fused: a
    # FlashAttention-2 step-0 kernel + Triton merge, drafts/attention.py), auto: fused on a GPU (flex below compute
    # capability 8.0), naive on the CPU
    fused_head: bool = True  # EAGLE-3: lm_head + soft-CE fused, no step's [T, Vd] logits kept (false: reference)
    # EAGLE-3: backward forms each step's elementwise work again (norms, rotary, SwiGLU product) and keeps only its
    # inputs and matrix products (drafts/policy.py apply_recompute); false keeps them: faster, more memory; None
    # (auto): on a GPU, off on the CPU, where the eager pieces cost more to form again and memory is not short
    recompute: Optional[bool] = None
    # EAGLE-1/2 only: fc bias (SGLang's LlamaForCausalLMEagle has one; vLLM's EAGLE-1 loader has none), the
    # uniform noise U(-a, a) added to the input features while training, and the loss weights of the feature
    # regression (SmoothL1) and of the soft cross-entropy of lm_head(f_hat). ttt_steps > 1 unrolls the chain.
    fc_bias: bool = True
    feature_noise: float = 0.1
    feature_weight: float = 1.0
    ce_weight: float = 0.1
    # Shape overrides; None takes the target's value.
    num_heads: Optional[int] = None
    num_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    intermediate_size: Optional[int] = None
    # warm start: a draft to begin from (a checkpoint, a run dir or any export; or the Hub id of one,
    # org/name[@revision][/folder]), and whose vocab map the run keeps:
    # draft (its own; default) or data (the one the data builds)
    init_from: Optional[str] = None
    init_vocab: str = "draft"


@dataclass
class DataConfig:
    # chat JSONL (OpenAI `messages` or ShareGPT `conversations`), or a Hugging Face data set id: org/name[@revision]
    # (its only *.jsonl file) or org/name[@revision]/<path in the repo>.jsonl
    path: str = MISSING
    eval_path: Optional[str] = None  # held-out chat JSONL for eval metrics (a Hub id too, as data.path)
    eval_holdout: int = 0  # without eval_path: hold this many examples of data.path out of training for eval
    cache_dir: Optional[str] = None  # tokenisation cache; default: <run_dir>/cache
    # d2t/t2d; default: built from the training data into <cache_dir>/vocab_<Vd>_<data fingerprint>.safetensors
    vocab_path: Optional[str] = None
    max_length: int = 2048
    thinking: str = "keep"  # keep | strip : Qwen3 <think>...</think> blocks and reasoning_content in assistant turns
    chat_template: Optional[str] = None  # a jinja chat template file to render with instead of the tokenizer's
    # keyword arguments of the chat template (one it never reads is refused), e.g. Qwen3's non-thinking mode: in a
    # recipe `chat_template_kwargs: {enable_thinking: false}`, on the command line (a new key of the dict, so `+`)
    # `+data.chat_template_kwargs.enable_thinking=false`
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    # the empty `<think>\n\n</think>\n\n` before a reply without reasoning: auto (masked when the generation prompt,
    # rendered with chat_template_kwargs, already holds it: the served model never generates it; else trained) |
    # mask | train
    empty_think: str = "auto"
    on_error: str = "raise"  # raise | skip : a bad JSONL line
    truncate: bool = True  # sequences over max_length: truncate (True) or drop (False); counted either way
    shuffle: bool = True
    # pack each batch's examples back to back into one row [1, N] (no padding; position_ids restart per document)
    # instead of right-padding them to [B, T]; attention, the GDN state and the loss stay within each document.
    # Qwen3-Next targets need our GDN core for it (gdn_impl auto on a GPU, or triton): HF's would leak state
    pack: bool = False
    # a directory written by `eagle-data dump`: train on stored target hidden states instead of running the
    # target (its manifest must match this run's target, aux layers and vocab map)
    offline_path: Optional[str] = None


@dataclass
class OptimConfig:
    lr: float = 1e-4
    min_lr_ratio: float = 0.1  # cosine schedule floor, as a fraction of lr
    warmup_steps: int = 50
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    max_grad_norm: float = 0.5
    batch_size: int = 1  # sequences per step per rank
    grad_accum: int = 1


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    max_steps: int = 1000
    epochs: int = 1  # upper bound; training stops at whichever of max_steps / epochs comes first
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 10
    save_every: int = 500
    eval_batches: int = 4  # held-out batches for the logged eval metrics (0: none)
    progress: bool = True
    # written to <run_dir>/export/<format>: sglang (plain LlamaForCausalLMEagle3), vllm (speculators format)
    export_formats: list[str] = field(default_factory=lambda: ["sglang", "vllm"])
    # none: start fresh; latest: the newest complete checkpoint in <run_dir>/checkpoints if there is one,
    # else start fresh; or a checkpoint directory. Restores draft, optimizer, scheduler, data position, RNG, step.
    resume: str = "none"
    # a new run (resume=none) into a run dir that holds an earlier run: refused, unless true, which moves the earlier
    # run's files aside to <run_dir>.old-<time> (nothing is deleted)
    overwrite: bool = False
    keep_last: int = 3  # step checkpoints kept (older ones deleted; checkpoints/best is kept apart); 0: keep all
    max_nonfinite_steps: int = 5  # a NaN/inf loss or gradient skips the step; this many in a row stop the run


@dataclass
class LogConfig:
    """Where metrics go besides <run_dir>/metrics.jsonl and the console (both always on, rank 0 only)."""

    tensorboard: bool = False  # event files in <run_dir>/tensorboard (needs the `tensorboard` package)
    wandb: bool = False  # a wandb run in <run_dir>/wandb (needs the `wandb` package)
    wandb_project: str = "eagle_trainer"
    wandb_mode: str = "offline"  # offline (sync later with `wandb sync`) | online


@dataclass
class AcceptConfig:
    """Real acceptance length while training: speculative decoding of held-out prompts by target and draft."""

    enabled: bool = True
    every: int = 0  # steps between measurements; 0: with every checkpoint (and at the start and the end)
    num_prompts: int = 8  # held-out prompts (eval split), each decoded up to max_new_tokens
    max_new_tokens: int = 64
    modes: list[str] = field(default_factory=lambda: ["chain", "tree"])  # the first picks the best checkpoint
    steps: int = 5  # chain: draft tokens per round
    topk: int = 8  # tree (EAGLE-2): children per expanded node and nodes expanded per depth
    depth: int = 5
    total_tokens: int = 31  # tree: draft tokens verified per round


@dataclass
class DemoConfig:
    """The embedded default job: build a tiny target, data and tokenizer locally, then train on them."""

    enabled: bool = False
    architecture: str = "qwen3"  # the tiny target: qwen3 (dense) | qwen3_moe | qwen3_next (hybrid GDN + MoE)
    num_prompts: int = 320
    num_eval_prompts: int = 32
    max_new_tokens: int = 40
    hidden_size: int = 128
    num_layers: int = 8
    vocab_size: int = 1024
    num_experts: int = 8  # MoE targets (qwen3_moe, qwen3_next): routed experts per layer
    top_k: int = 2  # MoE targets (qwen3_moe, qwen3_next): experts per token
    moe_intermediate_size: int = 64  # MoE targets (qwen3_moe, qwen3_next): each expert's SwiGLU width
    logit_std: float = 6.0  # sharpen the random target so its next-token distributions are far from uniform


@dataclass
class ParallelConfig:
    """How a run under torchrun spreads over its ranks (parallel/). One process: all of it is a no-op."""

    # the frozen target: fsdp (each decoder block sharded over all ranks, gathered for its forward and freed
    # after) or replicate (every rank holds the whole target; for targets that fit one GPU twice over)
    target: str = "fsdp"
    # expert parallelism: routed experts split over groups of `ep` ranks, tokens sent to their experts and back
    # (all-to-all); 1: none (experts are sharded with their block); 0: every rank (ep = world size).
    # ep must divide the world size and the expert count
    ep: int = 1
    # each MoE layer's tokens in this many chunks under expert parallelism: with NCCL one chunk's all-to-alls run
    # while another's experts compute (parallel/expert.py); 1: the whole layer at once
    ep_chunks: int = 1
    forward_prefetch: bool = True  # gather the next block's weights while this one computes
    prefetch_blocks: int = 1  # with forward_prefetch: how many blocks ahead are gathered (each held while it waits)
    backend: str = "auto"  # process-group backend: auto (nccl on GPUs, gloo on the CPU) | nccl | gloo


@dataclass
class Config:
    target: TargetConfig = field(default_factory=TargetConfig)
    draft: DraftConfig = field(default_factory=DraftConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    accept: AcceptConfig = field(default_factory=AcceptConfig)
    log: LogConfig = field(default_factory=LogConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    # modules that register targets, draft algorithms or export formats, loaded before the registry is used (with
    # the eagle_trainer.plugins entry points; app/plugins.py): dotted module names or paths of .py files
    plugins: list[str] = field(default_factory=list)
