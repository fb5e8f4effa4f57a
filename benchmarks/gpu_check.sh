#!/usr/bin/env bash
# The GPU checks of issue 4 in one command: the GPU tests, then cuda_bench.py.
#
#   bash benchmarks/gpu_check.sh fetch   # here, with network: wheels the GPU image lacks → .whl/
#   bash benchmarks/gpu_check.sh run     # on the GPU machine (carry .whl): tests + benchmark
#
# The GPU machine's image has CUDA, CuPy (cupy-cuda13x), a CUDA build of JAX, numpy, scipy,
# matplotlib, optax, tqdm and pytest, under Python 3.12, and no network. It lacks OpenMM,
# mdtraj, PeptideBuilder and Biopython; `fetch` downloads their Python 3.12 wheels (~26 MB)
# into .whl/ (ignored by git). `run` installs them into /tmp/site, puts the source tree on
# PYTHONPATH (the kernels are read from cuda/kernels), and writes to $OUT (or ./gpu_out):
#   gpu.txt          nvidia-smi's name, driver and memory, JAX's devices
#   gpu_tests.log    pytest -m gpu tests/test_cuda_backend.py
#   cuda_bench.log   benchmarks/cuda_bench.py (villin P = 60, ~5,000-atom OBC2 protein)
#   cuda_bench.json  the same, as JSON
# Each stage has its own time limit so that the whole run ends inside one 10-minute call
# and what finished comes back. Exit status: 0 when both stages passed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

case "${1:-run}" in
fetch)
    platforms=()
    for tag in manylinux_2_34 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 \
        manylinux2014 manylinux1; do
        platforms+=(--platform "${tag}_x86_64")
    done
    mkdir -p .whl
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${platforms[@]}" -d .whl \
        "openmm==8.6.1" "mdtraj==1.11.1.post2" "PeptideBuilder==1.1.0" "biopython==1.88"
    du -sh .whl
    ;;
run)
    OUT=${OUT:-$PWD/gpu_out}
    mkdir -p "$OUT"
    PY=${PYTHON:-python3}
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || exit 1
        export PYTHONPATH=/tmp/site
    fi
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    export TIMEMACHINE_CACHE=${TIMEMACHINE_CACHE:-/tmp/timemachine_cache}
    # JAX and CuPy share the GPU: JAX allocates as it goes instead of taking 75 % up front
    export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
    {
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
        "$PY" -c "import jax, cupy; print('jax', jax.__version__, jax.devices()); \
print('cupy', cupy.__version__, cupy.cuda.runtime.getDeviceCount(), 'GPU(s)')"
    } 2>&1 | tee "$OUT/gpu.txt"
    timeout "${TESTS_LIMIT_S:-270}" "$PY" -m pytest -q -p no:cacheprovider -m gpu \
        tests/test_cuda_backend.py 2>&1 | tee "$OUT/gpu_tests.log"
    tests=${PIPESTATUS[0]}
    read -r -a bench_args <<<"${BENCH_ARGS:-}"  # e.g. BENCH_ARGS="--steps 500"
    timeout "${BENCH_LIMIT_S:-270}" "$PY" benchmarks/cuda_bench.py \
        --json "$OUT/cuda_bench.json" "${bench_args[@]}" 2>&1 | tee "$OUT/cuda_bench.log"
    bench=${PIPESTATUS[0]}
    echo "gpu_check: tests exit $tests, benchmark exit $bench (124: stopped at its limit)"
    [ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
    ;;
*)
    echo "usage: bash benchmarks/gpu_check.sh fetch|run" >&2
    exit 2
    ;;
esac
