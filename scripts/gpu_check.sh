#!/usr/bin/env bash
# The GPU check, in one call (meant to stay near 5 minutes; every step has a timeout):
#   1. the environment (GPU, driver, cupy, torch)
#   2. python -m pytest -q tests/gpu with issue #18's CUDA kernels on (caffe-reference layers
#      and solvers on cupy, CPU/GPU parity of every layer type, each kernel against the array
#      code it replaces, device selection, snapshots across devices)
#   3. scripts/gpu_benchmark.py        (brewnet vs PyTorch CUDA, images/s and ratio), kernels
#      off (the array code on cupy) and on
#   4. brewnet time --gpu 0 on CaffeNet, kernels off and on (per-layer GPU times)
#   5. brewnet train --gpu 0 on a short LeNet run from HDF5 (configs/lenet_hdf5), kernels on
#   6. data-parallel ranks on the GPU (tests/gpu/test_gpu_mpi.py)
#   7. a summary, one line per step
#
# The fixtures come from FIXTURES=${BREWNET_FIXTURES:-shared/fixtures}. The device tool
# copies the repository without ../shared, so before calling it, in the repository root:
#     mkdir -p shared/fixtures && cp -r ../shared/fixtures/caffe-reference shared/fixtures/
#     python scripts/gpu_lenet_hdf5.py          # data/lenet_hdf5 from data/mnist (5.6 MiB)
# and run:  bash scripts/gpu_check.sh   with carry ["shared/fixtures", "data/lenet_hdf5"]
# (both are git-ignored). Without data/lenet_hdf5 the script makes it here: from
# data/mnist when present, else synthetic data (the summary says which).
#
#   bash scripts/gpu_check.sh [--quick]     # --quick: shorter benchmark
#   GPU_CHECK_NETS=lenet bash scripts/gpu_check.sh   # benchmark only some nets
set -u
cd "$(dirname "$0")/.."
FIXTURES="${BREWNET_FIXTURES:-shared/fixtures}"
# absolute, since some tests change folder
export BREWNET_FIXTURES="$(cd "$FIXTURES" 2>/dev/null && pwd || echo "$FIXTURES")"
FIXTURES="$BREWNET_FIXTURES"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's packages first
OUT="${OUT:-/tmp}/gpu_check"
mkdir -p "$OUT"
SECONDS_PER_NET=4
[ "${1:-}" = "--quick" ] && SECONDS_PER_NET=1.5
declare -a SUMMARY

step() { echo; echo "==== $* ===="; }
note() { SUMMARY+=("$1"); }

step "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | head -3
python - <<'PY'
import platform, numpy
print("python", platform.python_version(), "numpy", numpy.__version__)
try:
    import cupy
    n = cupy.cuda.runtime.getDeviceCount()
    p = cupy.cuda.runtime.getDeviceProperties(0)
    name = p["name"].decode() if isinstance(p["name"], bytes) else p["name"]
    print("cupy", cupy.__version__, "CUDA runtime", cupy.cuda.runtime.runtimeGetVersion(), "devices", n, "GPU0", name)
except Exception as exc:
    print("cupy unusable:", type(exc).__name__, exc)
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.cuda.is_available())
except ImportError:
    print("torch not installed")
try:
    import lmdb  # noqa: F401
    print("lmdb installed")
except ImportError:
    print("lmdb not installed (Data layers on LMDB untested here)")
PY
if ! python -c "import cupy, sys; sys.exit(0 if cupy.cuda.runtime.getDeviceCount() > 0 else 1)" 2>/dev/null; then
    echo "gpu_check: needs cupy and a CUDA device (pip install 'brewnet[gpu]'); nothing to check here"
    exit 2
fi
if [ -f "$FIXTURES/caffe-reference/layers/manifest.json" ]; then
    note "fixtures: $FIXTURES"
else
    note "fixtures: MISSING at $FIXTURES (caffe-reference cases skip)"
fi

# tests/gpu runs once, with issue #18's CUDA kernels switched on: every parity case then goes
# through them, and tests/gpu/test_gpu_cuda_kernels.py compares each kernel with the array code
# on cupy it replaces. GPU_CHECK_FULL=1 also runs tests/gpu with the switch off (+1-2 minutes).
step "pytest tests/gpu (BREWNET_CUDA_KERNELS=1)"
start=$(date +%s)
BREWNET_CUDA_KERNELS=1 timeout 200 python -m pytest -q -p no:cacheprovider tests/gpu -rs 2>&1 \
    | tee "$OUT/pytest_cuda.log" | tail -40
rc=${PIPESTATUS[0]}
note "tests/gpu, kernels on: rc=$rc, $(grep -E 'passed|failed' "$OUT/pytest_cuda.log" | tail -1) ($(( $(date +%s) - start ))s)"
if [ "${GPU_CHECK_FULL:-0}" = "1" ]; then
    step "pytest tests/gpu (kernels off: the array code on cupy)"
    start=$(date +%s)
    BREWNET_CUDA_KERNELS=0 timeout 200 python -m pytest -q -p no:cacheprovider tests/gpu -rs 2>&1 \
        | tee "$OUT/pytest.log" | tail -20
    rc=${PIPESTATUS[0]}
    note "tests/gpu, kernels off: rc=$rc, $(grep -E 'passed|failed' "$OUT/pytest.log" | tail -1) ($(( $(date +%s) - start ))s)"
fi

# the benchmark and brewnet time: the array code on cupy ("before"), then the kernels
for on in 0 1; do
    step "benchmark (brewnet on cupy vs PyTorch CUDA), BREWNET_CUDA_KERNELS=$on"
    start=$(date +%s)
    BREWNET_CUDA_KERNELS=$on timeout 150 python scripts/gpu_benchmark.py \
        --nets "${GPU_CHECK_NETS:-lenet,cifar10_quick,caffenet}" --seconds "$SECONDS_PER_NET" \
        --json "$OUT/benchmark_kernels$on.json" 2>&1 | tee "$OUT/benchmark_kernels$on.log"
    rc=${PIPESTATUS[0]}
    note "benchmark, kernels $on: rc=$rc ($(( $(date +%s) - start ))s); $(grep -E '^(lenet|cifar10_quick|caffenet) ' \
        "$OUT/benchmark_kernels$on.log" | awk '{printf "%s %s/%s img/s ratio %s %s; ", $1, $3, $4, $5, $6}')"
done

step "brewnet time --gpu 0, CaffeNet (batch 10), kernels off then on"
for on in 0 1; do
    BREWNET_CUDA_KERNELS=$on timeout 60 python -m brewnet time --model configs/caffenet/caffenet_deploy.prototxt \
        --iterations 10 --gpu 0 > "$OUT/time_caffenet_kernels$on.log" 2>&1
    echo "-- BREWNET_CUDA_KERNELS=$on (rc=$?)"
    grep -E "^(conv|pool|norm|relu|fc|drop|prob)[0-9]* |Average (Forward|Backward)" "$OUT/time_caffenet_kernels$on.log"
    note "time CaffeNet, kernels $on: $(grep -E 'Average (Forward|Backward) pass' "$OUT/time_caffenet_kernels$on.log" \
        | sed 's/Average //; s/ pass//' | tr '\n' ' ')"
done

step "brewnet train --gpu 0 (LeNet from HDF5, 500 iterations, kernels on)"
start=$(date +%s)
if [ ! -f data/lenet_hdf5/train.h5 ]; then
    python scripts/gpu_lenet_hdf5.py | tee "$OUT/lenet_data.log"
else
    echo "lenet_hdf5: using the carried data/lenet_hdf5" | tee "$OUT/lenet_data.log"
fi
rm -rf runs/lenet_hdf5
BREWNET_CUDA_KERNELS=1 timeout 150 python -m brewnet train --solver configs/lenet_hdf5/lenet_solver.prototxt \
    --gpu 0 2>&1 | tee "$OUT/train.log" | grep -E "Using GPU|Iteration [0-9]+, loss|Test net output|Snapshotting|error|Error" | tail -20
rc=${PIPESTATUS[0]}
acc=$(grep -E "Test net output #0: accuracy" "$OUT/train.log" | tail -1 | sed 's/.*accuracy = //')
note "train --gpu 0, kernels on: rc=$rc, final test accuracy ${acc:-?} ($(head -1 "$OUT/lenet_data.log" | cut -c1-60)) ($(( $(date +%s) - start ))s)"
if [ -f runs/lenet_hdf5/lenet_iter_500.caffemodel ]; then
    python -m brewnet test --model configs/lenet_hdf5/lenet_train_test.prototxt \
        --weights runs/lenet_hdf5/lenet_iter_500.caffemodel --iterations 5 2>&1 | tail -2
    note "GPU-trained weights scored on CPU: rc=$?"
fi

# data-parallel training on the GPU (docs/PARALLEL.md): two ranks sharing GPU 0 through the
# host path (`brewnet train --ranks 2 --gpu 0`) against one process at twice the batch, and
# the NCCL reducer on a one-rank communicator; NCCL between GPUs needs a machine with several
step "data-parallel on the GPU (tests/gpu/test_gpu_mpi.py)"
start=$(date +%s)
timeout 120 python -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_mpi.py -rs 2>&1 | tee "$OUT/mpi.log" | tail -15
rc=${PIPESTATUS[0]}
note "gpu mpi: rc=$rc, $(grep -E 'passed|failed|skipped' "$OUT/mpi.log" | tail -1) ($(( $(date +%s) - start ))s)"

step "summary"
for line in "${SUMMARY[@]}"; do echo "  $line"; done
