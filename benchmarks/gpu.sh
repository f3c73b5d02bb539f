#!/usr/bin/env bash
# The GPU check of issue 12, for one lent GPU (at most ~8 minutes on one H100):
#   1. the kernel tests compiled on CUDA (TRITON_INTERPRET=0),
#   2. benchmarks/kernels.py at d=4096, 16384 tokens (fused kernel vs torch path vs cuBLAS),
#   3. the layers table on CUDA (benchmarks/layers.py: plans, einsum, two-bmm Monarch, fused),
# results with the device name under benchmarks/results/gpu/ (or $OUT when set).
#
#   bash benchmarks/gpu.sh            # on the GPU machine
#   bash benchmarks/gpu.sh --dry-run  # on CPU: every step once, tiny sizes, kernels interpreted
set -euo pipefail
cd "$(dirname "$0")/.."
dry=0
case "${1:-}" in
    --dry-run) dry=1 ;;
    "") ;;
    *) echo "usage: bash benchmarks/gpu.sh [--dry-run]" >&2; exit 2 ;;
esac
out="${OUT:-benchmarks/results/gpu}"

if [ "$dry" = 1 ]; then
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    echo "== 1. kernel tests (interpreted, a sample)"
    TRITON_INTERPRET=1 python -m pytest -q -x tests/test_kernels.py -k "forward or backward" \
        --maxfail=1 -p no:cacheprovider | tail -3
    echo "== 2. kernels.py, every d=4096 case once on CPU"
    TRITON_INTERPRET=1 python benchmarks/kernels.py --dry-run --dims 4096 --tokens 16384
    echo "== 3. layers table, tiny sizes, CPU, one repeat"
    python benchmarks/layers.py --device cpu --sizes 64,256,32 --dtypes float32 bfloat16 \
        --repeats 1 --out "$tmp"
    test -s "$tmp/layers.csv" && test -s "$tmp/layers.md" && test -s "$tmp/layers.png"
    echo "dry run ok: every step ran; nothing was timed"
    exit 0
fi

python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$out/device.txt" || true
echo "== 1. kernel tests on CUDA"
TRITON_INTERPRET=0 timeout 200 python -m pytest -q -p no:cacheprovider tests/test_kernels.py \
    2>&1 | tee "$out/kernel_tests.txt" | tail -5
echo "== 2. kernels.py d=4096, 16384 tokens"
TRITON_INTERPRET=0 timeout 120 python benchmarks/kernels.py --dims 4096 --tokens 16384 --out "$out"
echo "== 3. layers table on CUDA (bf16, then fp32)"
TRITON_INTERPRET=0 timeout 150 python benchmarks/layers.py --device cuda --dtypes bfloat16 float32 \
    --repeats 10 --out "$out"
echo "results in $out/"
