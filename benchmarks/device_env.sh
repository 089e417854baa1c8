# Sourced by the benchmarks/device_*.sh scripts: $OUT, the dependencies' wheels from .whl/ into /tmp/site (fla left
# out: HF's Qwen3-Next would call fla's GPU kernels on CPU tensors in the tests), fla alone into /tmp/peers for the
# peer benchmarks (PYTHONPATH=$PEERS_PATH adds it), and PYTHONPATH for this checkout.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# installed once a machine (the same wheels again are skipped: a later call must not rewrite files that processes
# left running by an earlier one, e.g. device_quality.sh's background stages, are importing)
wheels=$(ls .whl/*.whl | grep -v -e fla_core -e flash_linear_attention)
if [ "$(cat /tmp/site/.wheels 2>/dev/null)" != "$wheels" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $wheels || exit 1
    echo "$wheels" > /tmp/site/.wheels
fi
if ls .whl/fla_core-*.whl > /dev/null 2>&1 && [ ! -d /tmp/peers/fla ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/peers .whl/fla_core-*.whl \
        .whl/flash_linear_attention-*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
PEERS_PATH=/tmp/peers:/tmp/site:$PWD
