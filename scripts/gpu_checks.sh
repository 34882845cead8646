#!/usr/bin/env bash
# GPU checks run on the lent H200 (after the bring-up in ../shared/gpu/README.md installed TE,
# megatron-core and our wheels into /tmp/site). Every GPU number in a closing note comes from here.
#   1. the TE and local layer specs against transformers' olmo_hybrid (HF reference on CPU)
#   2. the olmo_hybrid_1b preset trained on the stdlib demo corpus (loss, tokens/s/GPU, MFU)
set -uo pipefail
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/triton_cache TORCHDYNAMO_DISABLE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .gpu/extra2/*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
if [ -z "${SKIP_PARITY:-}" ]; then
echo "== 1. spec parity vs transformers"
for spec in ${SPECS:-te local}; do
  python3 tools/compare_hf.py --hf-config tests/fixtures/tiny_hf_config.json --spec "$spec" --grads 2>&1 | tail -3
  python3 tools/compare_hf.py --hf-config tests/fixtures/tiny_hf_config.json --spec "$spec" --dtype bf16 2>&1 | tail -2
done
fi
echo "== 2. olmo_hybrid_1b on the demo corpus"
python3 -m megatron_hybrid.demo --out /tmp/demo1b --preset olmo_hybrid_1b --train-iters "${ITERS:-250}" \
  --seq-length 2048 --global-batch-size 8 --micro-batch-size 4 --lr 1e-3 --vocab 8192 \
  > "$OUT/demo1b.log" 2>&1
grep -E "parameters:|layer spec|iteration +(10|50|100|150|200|250)/|validation|\[demo\]|rror" "$OUT/demo1b.log" | tail -30
