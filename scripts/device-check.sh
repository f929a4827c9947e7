#!/usr/bin/env bash
# The GPU check, prepared so that a session lent a device machine runs it in one call (issue 23).
#
#   scripts/device-check.sh --prepare   here, where PyPI is reachable: download into .whl/ the
#                                       wheels the device image lacks (Python 3.12, x86-64)
#   scripts/device-check.sh             on the device: install those wheels under /tmp/site, then
#                                       run every check below, writing logs and JSON under $OUT
#   scripts/device-check.sh --dry-run   anywhere (CI does): the same checks on this machine's
#                                       Python; on a machine without a GPU the GPU parts skip or
#                                       say why, and the NumPy path of notebook 05 runs
#
# The checks: `nvidia-smi`; `pytest -m gpu` on the GPU tests; `nbparallel bench -n 2 --only gpu`
# (the CUDA IPC activation hop and the RawKernel stencil, each beside the same device's
# device-to-device copy); notebook 05 executed on the nbparallel kernel; `%nbp status` with its
# NVML columns. Each step has its own time limit, and the limits add up to 7.6 minutes, so a
# failed first run leaves time for a fix and a rerun within a session's 15 minutes of device time.
# A failing step is reported and the others still run; the exit status says whether all passed.
#
# On the device, through the `device` tool's `run` (carry .whl):
#   bash scripts/device-check.sh
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
mode=${1:-device}
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d -t nbp-device-check-XXXXXX)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

# What nbparallel needs that the device image ("cuda", KINDS.md) does not hold. Resolved with
# their dependencies at --prepare time; the image's own copies of the rest are kept.
NEEDS=(ipython ipykernel "ipyparallel>=8.8" "ipywidgets>=8" "nbclient>=0.10" "nbformat>=5.9")
ON_DEVICE=" absl-py attrs certifi charset-normalizer cloudpickle decorator filelock fsspec idna \
 jinja2 markupsafe numpy packaging pillow pip platformdirs psutil pygments python-dateutil pyyaml \
 requests setuptools six typing-extensions urllib3 wheel cupy-cuda13x nvidia-ml-py "

prepare() {
    rm -rf .whl && mkdir -p .whl
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    "$PY" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "${NEEDS[@]}" || return 1
    for wheel in .whl/*.whl; do
        name=$(basename "$wheel" | cut -d- -f1 | tr '_A-Z' '-a-z')
        case "$ON_DEVICE" in *" $name "*) rm -f "$wheel" ;; esac
    done
    echo "device-check: $(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1), in .whl/ (carry .whl)"
}

install() {
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "device-check: no wheels in .whl/: run scripts/device-check.sh --prepare first and" \
             "name .whl in the run's carry" >&2
        return 1
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || return 1
    export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    export PATH="/tmp/site/bin:$PATH"
}

failed=()
step() {  # step NAME SECONDS COMMAND...: run it with a bound, log it, remember a failure
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "== $name (at most ${limit} s)" | tee -a "$OUT/device-check.log"
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 20 "$OUT/$name.log" | tee -a "$OUT/device-check.log"
    echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/device-check.log"
    [ "$rc" -eq 0 ] || failed+=("$name (exit $rc)")
}

case "$mode" in
    --prepare) prepare; exit ;;
    --dry-run) ;;
    device) install || exit 1 ;;
    *) echo "usage: scripts/device-check.sh [--prepare | --dry-run]" >&2; exit 2 ;;
esac

date -u +"device-check: %Y-%m-%dT%H:%M:%SZ, mode $mode, output in $OUT" | tee "$OUT/device-check.log"
if command -v nvidia-smi >/dev/null 2>&1; then
    step nvidia-smi 15 nvidia-smi
    bench=("$PY" -m nbparallel bench -n 2 --only gpu --output "$OUT/bench-gpu.json")
else
    echo "device-check: no nvidia-smi on this machine: the GPU parts skip" | tee -a "$OUT/device-check.log"
    # Without a GPU the gpu group cannot run; it passes when every row says why.
    bench=(bash -c '"$0" -m nbparallel bench -n 2 --only gpu --output "$1"; "$0" -c "
import json, sys
rows = json.load(open(sys.argv[1]))[\"cases\"]
why = \"needs two engines of this host bound to GPUs\"
sys.exit(0 if rows and all(why in (r[\"error\"] or \"\") for r in rows) else 1)" "$1"' \
        "$PY" "$OUT/bench-gpu.json")
fi
step pytest-gpu 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_cudaipc.py tests/test_tp.py tests/test_model_parallel.py
step bench-gpu 150 "${bench[@]}"
step notebook-05 100 "$PY" -m nbparallel demo -n 2 --notebook notebooks/05-gpu.ipynb \
    --output "$OUT/05-gpu.executed.ipynb"
step nbp-status 40 "$PY" - <<'EOF'
import nbparallel
from nbparallel.magics import _status_table

session = nbparallel.start(2)
try:
    print(_status_table(session))
finally:
    nbparallel.stop()
EOF

if [ ${#failed[@]} -gt 0 ]; then
    echo "device-check: failed: ${failed[*]}" | tee -a "$OUT/device-check.log"
    exit 1
fi
echo "device-check: every step passed" | tee -a "$OUT/device-check.log"
