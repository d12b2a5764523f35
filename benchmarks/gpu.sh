#!/usr/bin/env bash
# dgdlens on a GPU: the CUDA tests and benchmarks as prepared runs, for a short loan of a GPU machine whose
# image holds PyTorch, numpy, scipy, pandas, scikit-learn, h5py, numba, lightning and jax but not the
# scverse packages, and reaches no network. The missing packages travel as wheels in .whl/ (git-ignored).
#
#   bash benchmarks/gpu.sh wheels   # here, with a package registry: the missing packages into .whl/
#   bash benchmarks/gpu.sh check    # there: install, tests/test_cuda.py, benchmarks/gpu_probe.py (3-4 min)
#   bash benchmarks/gpu.sh bench    # there: time to quality at 100,000 cells on the GPU, DGD then scVI
#
# Each stage has its own time limit and writes its log to $OUT (the device tool's folder; else
# /tmp/dgdlens-gpu); summary.txt says how each stage ended. Run from the repository root.
set -u
MODE=${1:-check}
OUT=${OUT:-/tmp/dgdlens-gpu}
PYVER=${PYVER:-3.12}   # the GPU image's Python, for the compiled wheels
DEVICE=${DEVICE:-cuda}          # DEVICE=cpu DGDLENS_TEST_DEVICE=cpu: a dry run of the script on a CPU
PROBE_ARGS=${PROBE_ARGS:-}      # e.g. "--cells 20000" for a dry run
TTQ_CELLS=${TTQ_CELLS:-100000}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

# what a fresh `pip install dgdlens` resolves on Python 3.12 (anndata 0.13, scanpy 1.12, mudata 0.4), less the
# image's own packages, plus scvi-tools for the baseline (and six, which its docrep needs; the image lists
# it); pure Python except google-crc32c, msgspec, numcodecs, pydantic_core and scikit-misc
WHEELS="anndata==0.13.4 scanpy==1.12.5 mudata==0.4.1 zarr==3.4.2 numcodecs==0.17.1 google-crc32c==1.9.0
array-api-compat==1.16.0 donfig==0.8.1.post1 fast-array-utils==1.5.1 legacy-api-wrap==1.5 msgspec==0.23.0
natsort==8.4.0 pynndescent==0.7.0 umap-learn==0.5.12 scverse-misc==0.1.7 session-info2==0.4.2 tzdata==2026.6
pydantic==2.14.4 pydantic_core==2.50.5 pydantic-settings==2.16.3 annotated-types==0.8.0 typing-inspection==0.4.5
python-dotenv==1.2.4 scvi-tools==1.4.2 ml_collections==1.1.0 pyro-ppl==1.9.2 pyro-api==0.1.2 sparse==0.19.3
scikit-misc==0.5.3 six==1.17.0"

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, note the end
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$OUT/$name.log"
    echo "$name: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
    return $rc
}

install() {
    if [ -d .whl ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || { echo "wheel install failed" | tee -a "$OUT/summary.txt"; exit 1; }
        export PYTHONPATH=/tmp/site
    fi
    export PYTHONPATH="$PWD/src:$PWD/tests:${PYTHONPATH:-}"
}

case "$MODE" in
wheels)
    mkdir -p .whl
    # docrep ships only a source archive: build its (pure-Python) wheel here
    python3 -m pip wheel -q --no-deps -w .whl docrep==0.3.2 || exit 1
    # shellcheck disable=SC2086
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $WHEELS || exit 1
    du -sh .whl
    ;;
check)
    install
    stage env 120 python3 -c "import sys, torch, anndata, scanpy, mudata, dgdlens; \
print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO GPU', 'anndata', anndata.__version__, \
'scanpy', scanpy.__version__, 'dgdlens', dgdlens.__version__)" || exit 1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT/env.log" 2>&1
    stage tests 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda.py \
        tests/test_steer.py::test_steer_on_cuda_matches_cpu tests/test_dgd.py::test_device_argument
    # shellcheck disable=SC2086
    stage probe 240 python3 benchmarks/gpu_probe.py --device "$DEVICE" --threads 8 --out "$OUT/probe.json" $PROBE_ARGS
    ;;
bench)
    install
    # one model at a time, each with the whole GPU (side by side they would share it); 8 CPU threads each
    stage ttq 540 python3 benchmarks/time_to_quality.py --cells "$TTQ_CELLS" --device "$DEVICE" --threads 8 --grid 1.5 \
        --data-dir /tmp/dgdlens-ttq --tag time_to_quality_gpu
    cp benchmarks/results/time_to_quality_gpu/table.md "$OUT/ttq_table.md" 2>/dev/null
    cp benchmarks/results/time_to_quality_gpu/curves.png "$OUT/ttq_curves.png" 2>/dev/null
    tar -czf "$OUT/ttq_results.tar.gz" -C benchmarks/results time_to_quality_gpu 2>/dev/null
    ;;
*)
    echo "usage: bash benchmarks/gpu.sh wheels|check|bench" >&2
    exit 2
    ;;
esac
