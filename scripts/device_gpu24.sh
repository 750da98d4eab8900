#!/usr/bin/env bash
# The GPU checks in one go, for a machine with a CUDA GPU and PyTorch but no registry access:
# install the carried wheels, print the GPU, run the CUDA tests, then benchmarks/bench_gpu24.py.
#
#   bash scripts/device_gpu24.sh            # logs and gpu24.{json,md} land in $OUT (default /tmp/gpu24-out)
#
# Wheels: .whl/ holds what the machine lacks, built for its Python (transformers==5.24.0,
# compressed-tensors==0.14.0.1 and its loguru/pydantic stack, typer, regex, and this project's own wheel,
# `pip wheel --no-deps -w .whl .`). Without .whl/ the machine's own packages are used.
# PY=python, SKIP_INSTALL=1, SKIP_TESTS=1 and QUICK=1 are for dry runs and reruns.
set -uo pipefail
OUT=${OUT:-/tmp/gpu24-out}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SRC=$(cd "$(dirname "$0")/.." && pwd)

if [ -z "${SKIP_INSTALL:-}" ] && ls "$SRC"/.whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --ignore-requires-python \
        --upgrade --target /tmp/site "$SRC"/.whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# The tree laid out as installed (cli/ and runtimes/ are sparse_export.cli and sparse_export.runtimes),
# so that tests and benchmark import the tree's code whatever their sys.path.
W=$(mktemp -d /tmp/sparse-export-tree.XXXX)
cp -r "$SRC"/sparse_export "$SRC"/tests "$SRC"/benchmarks "$SRC"/pyproject.toml "$W"/
cp -r "$SRC"/cli "$W"/sparse_export/cli
cp -r "$SRC"/runtimes "$W"/sparse_export/runtimes
cd "$W" || exit 1

{
    nvidia-smi || true
    "$PY" - <<'EOF'
import importlib.metadata as md, sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuSPARSELt", torch.backends.cusparselt.is_available() and torch.backends.cusparselt.version())
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
for name in ("transformers", "compressed-tensors", "safetensors", "tokenizers", "numpy", "typer", "sparse-export"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
EOF
} 2>&1 | tee "$OUT/env.log"

tests_rc=0
if [ -z "${SKIP_TESTS:-}" ]; then
    echo "== tests"
    timeout 240 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_compressed.py tests/test_runtimes.py 2>&1 \
        | tee "$OUT/tests.log"
    tests_rc=${PIPESTATUS[0]}
fi

echo "== bench_gpu24.py"
timeout 330 "$PY" benchmarks/bench_gpu24.py ${QUICK:+--quick} --out "$OUT/gpu24" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}

echo "tests rc=$tests_rc bench rc=$bench_rc"
rm -rf "$W"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
