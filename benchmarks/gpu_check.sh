#!/usr/bin/env bash
# The GPU check: tests/test_gpu.py and tests/test_triton_scan.py on a CUDA GPU, then benchmarks/bench_gpu.py.
#
# Two steps, because the GPU machine of the device tool has PyTorch, Triton, OpenCV, scikit-image, pytest ...
# but no network, no BasicSR and no ../shared:
#
#   1. here, in the checkout the device tool sends (a machine with this project installed; PYTHON=... names
#      its interpreter if it is not ./.venv's):
#        bash benchmarks/gpu_check.sh prepare     # fills .gpu_check/ (git-ignored, ~25 MB): BasicSR's
#                                                 # pure-Python package and the official reference outputs
#   2. on the GPU machine (repository root):
#        device run: command 'bash benchmarks/gpu_check.sh run', carry ['.gpu_check'], timeout_s 590
#      It prints the device, the versions, the test summary and the benchmark with its targets, and writes
#      tests.log, bench.log and bench_gpu.json under $OUT (or .gpu_check/out). About 5-7 minutes on an H200.
#      'run sweep' also times the triton kernels' tile constants (about 2 minutes more);
#      BENCH_ARGS overrides the benchmark's arguments (e.g. BENCH_ARGS='--scan-only --shapes c d').
set -u
cd "$(dirname "$0")/.."
DEST=.gpu_check

prepare() {
    local py=${PYTHON:-python3}  # a Python with this project installed: $PYTHON, else ./.venv's, else python3
    [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && py=.venv/bin/python
    rm -rf "$DEST" && mkdir -p "$DEST/site" "$DEST/shared/reference" || exit 1
    # BasicSR is pure Python (built without its CUDA extensions): copy the installed package
    local basicsr_dir
    basicsr_dir=$("$py" -c 'import importlib.util as u; print(u.find_spec("basicsr").submodule_search_locations[0])') \
        || exit 1
    cp -r "$basicsr_dir" "$DEST/site/" && find "$DEST/site" -name __pycache__ -prune -exec rm -rf {} + || exit 1
    # the official reference outputs tests/test_gpu.py compares with (the list in tests/conftest.py)
    local shared=${MAMBAIR_SHARED:-../shared}
    local files
    files=$("$py" - <<'EOF'
import ast
tree = ast.parse(open('tests/conftest.py').read())
names = next(n.value for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], 'id', '') == 'REFERENCE_FILES')
print(' '.join(ast.literal_eval(names)))
EOF
) || exit 1
    for f in $files; do
        cp "$shared/reference/$f" "$DEST/shared/reference/" || exit 1
    done
    du -sh "$DEST"
    echo "prepared $DEST; now on the GPU machine: bash benchmarks/gpu_check.sh run (carry .gpu_check)"
}

run() {
    local out=${OUT:-$DEST/out}
    mkdir -p "$out"
    export PYTHONPATH="$PWD:$PWD/$DEST/site${PYTHONPATH:+:$PYTHONPATH}"
    export MAMBAIR_SHARED="$PWD/$DEST/shared" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv || true
    python3 - <<'EOF' || exit 1
import torch, triton, basicsr_mambair
from basicsr_mambair.ops import scan as ss
print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, '
      f'GPU {torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}')
print(f'mamba_ssm: {ss.cuda.unavailable_reason() or "imports"}; triton backend: '
      f'{ss.triton.unavailable_reason() or "compiled and self-checked"}; auto on CUDA: {ss.get_backend("cuda")}')
EOF
    echo "== tests (tests/test_gpu.py, tests/test_triton_scan.py) =="
    timeout 300 python3 -m pytest -q -rfEs -p no:cacheprovider --durations=15 tests/test_gpu.py \
        tests/test_triton_scan.py 2>&1 | tee "$out/tests.log"
    echo "== benchmark (benchmarks/bench_gpu.py ${BENCH_ARGS:-}) =="
    # shellcheck disable=SC2086
    timeout 240 python3 benchmarks/bench_gpu.py --json "$out/bench_gpu.json" ${BENCH_ARGS:-} 2>&1 | tee "$out/bench.log"
    if [ "${1:-}" = sweep ]; then
        echo "== sweep of the triton constants =="
        timeout 200 python3 benchmarks/bench_gpu.py --sweep-only --repeats 10 --json "$out/sweep.json" 2>&1 \
            | tee "$out/sweep.log"
    fi
}

case "${1:-}" in
    prepare) prepare ;;
    run) shift; run "$@" ;;
    *) sed -n '2,20p' "$0"; exit 2 ;;
esac
