#!/bin/bash
# One device call for offline mode (on nvidia-h200-x2 or larger): benchmarks/offline.py on GPU 0, a 2-GPU
# `eagle-data dump` under torchrun (NCCL) compared tensor for tensor with a 1-GPU dump, and the tests of
# checkpoints, resume and offline training.
# Usage (device machine, repo root): bash benchmarks/device_offline.sh        Logs land in $OUT.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
CUDA_VISIBLE_DEVICES=0 timeout 240 python3 benchmarks/offline.py --results "$OUT/RESULTS.md" > "$OUT/offline.log" 2>&1
W=/tmp/dump_check; rm -rf $W; mkdir -p $W
python3 - "$W" <<'PY' > "$OUT/dump_check.log" 2>&1
import sys, torch
from pathlib import Path
from eagle_trainer.config import Config, DemoConfig, TrainConfig
from eagle_trainer.app.demo import prepare_demo
from eagle_trainer.app.data import main
w = Path(sys.argv[1])
cfg = prepare_demo(Config(demo=DemoConfig(enabled=True, num_prompts=64, num_eval_prompts=4),
                          train=TrainConfig(run_dir=str(w), progress=False)), torch.device("cuda"))
main(["vocab", "--tokenizer", cfg.target.path, "--data", cfg.data.path, "--draft-vocab-size", "256",
      "--out", str(w / "vocab.safetensors"), "--max-length", "256"])
PY
ARGS="--target $W/target --data $W/data/train.jsonl --vocab $W/vocab.safetensors --max-length 256 --batch-size 1 --compress fp8 --no-progress"
timeout 120 torchrun --nproc-per-node 2 -m eagle_trainer.app.data dump $ARGS --out $W/two >> "$OUT/dump_check.log" 2>&1
CUDA_VISIBLE_DEVICES=0 timeout 120 python3 -m eagle_trainer.app.data dump $ARGS --out $W/one >> "$OUT/dump_check.log" 2>&1
python3 - "$W" <<'PY' >> "$OUT/dump_check.log" 2>&1
import sys, torch
from pathlib import Path
from eagle_trainer.data.offline import OfflineStore
w = Path(sys.argv[1])
one, two = OfflineStore(w / "one"), OfflineStore(w / "two")
assert len(one) == len(two) and two.manifest["world_size"] == 2
same = all(torch.equal(a, b) for i in range(len(one))
           for a, b in zip(one.example(i, dequantize=False).values(), two.example(i, dequantize=False).values()))
print(f"2-GPU dump vs 1-GPU dump: {len(one)} examples, {one.manifest['num_tokens']} tokens, identical={same}")
PY
timeout 200 python3 -m pytest -q tests/test_checkpoint.py tests/test_resume.py tests/test_train_offline.py \
    tests/data/test_offline.py -W ignore::UserWarning > "$OUT/tests.log" 2>&1
echo "=== summary"; grep -E "passed|failed" "$OUT/tests.log" | tail -3; grep -E "FAILED" "$OUT/tests.log"
tail -2 "$OUT/dump_check.log"
grep -E "^ours|^specforge|^train tokens" "$OUT/offline.log"; grep "^|" "$OUT/offline.log"
