#!/usr/bin/env bash
# bench/gpu_check.sh: the whole GPU check of fused-lora on one CUDA machine, in under 6 minutes.
#
#   1. install what is missing (bitsandbytes, ...) from wheels in .whl/ into /tmp/site (no network needed)
#   2. build the package and its C++/CUDA extension (pip install --no-build-isolation -e .)
#   3. run the gpu-marked tests (pytest -m gpu)
#   4. run the quick benchmark sweep with the end-to-end QLoRA step
#      (python -m fused_lora bench --quick --output bench/results)
#   5. render the report (markdown + PNG plots: python -m fused_lora bench --report <the JSON of step 4>)
# Every step runs under `timeout`, sized from what is left of the budget, so the whole stays inside BUDGET_S
# (default 340 s: the script ends by about 340 + 10 + 3 s, inside the 6 minutes a GPU session allows). The log and
# the results land in bench/results/<gpu>/, and are copied to $OUT when it is set: the log is written there from the
# start and the results JSON as soon as the bench ends, so that a run stopped from outside still returns them.
# A short summary table is printed last. Usage, from anywhere:  bash bench/gpu_check.sh
# Environment: BUDGET_S (seconds, default 340), PYTHON (default python3), FUSED_LORA_COMMIT (recorded in the
# results when the checkout has no .git).
set -u -o pipefail
cd "$(dirname "$0")/.."

BUDGET_S=${BUDGET_S:-340}
PY=${PYTHON:-python3}
RESULTS_ROOT=bench/results  # passed to the bench as --output: the JSON goes to $RESULTS_ROOT/<gpu>/
START=$(date +%s)
export PYTHONUNBUFFERED=1
if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    LOG=$OUT/gpu_check.log  # there from the first line: the device tool returns $OUT even from a run it stops
else
    LOG=$(mktemp -d)/gpu_check.log
fi
exec > >(tee -a "$LOG") 2>&1

SUMMARY=()
FAILED=0
elapsed() { echo $(( $(date +%s) - START )); }

# step NAME CAP_S RESERVE_S COMMAND...: run COMMAND under a limit of min(CAP_S, time left - RESERVE_S), where
# RESERVE_S is kept for the steps after it. Records "NAME | status | seconds" for the summary.
step() {
    local name=$1 cap=$2 reserve=$3
    shift 3
    local left=$(( BUDGET_S - $(elapsed) - reserve ))
    local limit=$(( cap < left ? cap : left ))
    if (( limit < 5 )); then
        FAILED=1
        SUMMARY+=("$name|skipped: no time left|0")
        echo "=== $name: skipped, no time left"
        return 1
    fi
    echo "=== $name (limit ${limit}s, ${BUDGET_S}s budget, $(elapsed)s used) ==="
    local t0 rc status
    t0=$(date +%s)
    # SIGINT first: pytest then prints its failures and summary, and Python code its traceback, before stopping
    timeout -s INT --kill-after=10 "$limit" "$@"
    rc=$?
    case $rc in
        0) status="ok" ;;
        124|137) status="timed out after ${limit}s" ;;
        *) status="failed (exit $rc)" ;;
    esac
    (( rc == 0 )) || FAILED=1
    SUMMARY+=("$name|$status|$(( $(date +%s) - t0 ))")
    echo "=== $name: $status"
    return $rc
}

echo "=== gpu_check: $(date -u +%FT%TZ) in $(pwd)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"
if [[ ! -e .git && -z "${FUSED_LORA_COMMIT:-}" ]]; then
    echo "warning: this copy has no .git and FUSED_LORA_COMMIT is unset: the results will record commit 'unknown'"
fi

# 1. Missing packages from .whl/ (see bench/README.md for fetching the bitsandbytes wheel).
missing=$("$PY" - <<'EOF'
import importlib.util
need = ["bitsandbytes", "peft", "transformers", "tqdm", "matplotlib", "pytest_benchmark"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
EOF
)
if [[ -n "$missing" ]]; then
    echo "missing Python packages: $missing"
    if compgen -G ".whl/*.whl" >/dev/null; then
        step "install wheels" 45 280 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        SUMMARY+=("install wheels|no .whl/ folder: peers needing $missing will be skipped|0")
    fi
else
    SUMMARY+=("install wheels|nothing missing|0")
fi

# 2. Build: the editable install builds fused_lora._C with nvcc.
export MAX_JOBS=${MAX_JOBS:-16}
if ! step "build extension" 120 200 "$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e .; then
    echo "extension build failed: installing the Python package alone so the kernels and benchmarks still run"
    FUSED_LORA_NO_EXT=1 step "install without extension" 40 180 \
        "$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e .
fi

# 3. GPU tests (the bench below keeps 150 s), named file by file: pytest imports every module it collects before -m
# deselects, and a test module that imports bitsandbytes would stop the whole collection on a machine without it.
# The kernels' correctness first (each path at real shapes, bf16): on a cold machine the autotuner's compilations
# take most of the limit, and a run cut by it should still have them.
GPU_TESTS=(tests/test_kernels_gpu_paths.py tests/test_kernels_gpu.py tests/test_optim_gpu.py tests/test_nf4.py
           tests/test_modules.py tests/test_dora_gpu.py tests/test_benchmark_cli.py)
step "pytest -m gpu" 100 150 "$PY" -m pytest -m gpu -q -ra --durations=15 -p no:cacheprovider "${GPU_TESTS[@]}"

# 4. Quick sweep + end-to-end step; --max-seconds makes it stop starting cases before its own limit.
marker=$(mktemp)
left=$(( BUDGET_S - $(elapsed) - 25 ))
step "bench --quick" "$left" 25 \
    "$PY" -m fused_lora bench --quick --output "$RESULTS_ROOT" --max-seconds $(( left - 20 ))
early_json=$(find "$RESULTS_ROOT" -name '2*.json' -newer "$marker" 2>/dev/null | sort | tail -n 1)
if [[ -n "${OUT:-}" && -n "$early_json" ]]; then cp "$early_json" "$OUT/"; fi  # before anything else can stop us

# 5. Report of the results this run wrote, then collect the files.
results_json=$(find "$RESULTS_ROOT" -name '2*.json' -newer "$marker" 2>/dev/null | sort | tail -n 1)
if [[ -n "$results_json" ]]; then
    step "report" 40 0 "$PY" -m fused_lora bench --report "$results_json" >/dev/null
    results_dir=$(dirname "$results_json")
else
    results_dir=$RESULTS_ROOT/unknown-gpu
    mkdir -p "$results_dir"
    SUMMARY+=("report|no results JSON was written|0")
fi

echo
echo "=== summary ($(elapsed)s of ${BUDGET_S}s)"
printf '%-28s %-60s %6s\n' "step" "status" "s"
for line in "${SUMMARY[@]}"; do
    IFS='|' read -r name status secs <<<"$line"
    printf '%-28s %-60s %6s\n' "$name" "$status" "$secs"
done
if [[ -f "$results_dir/report.md" && "$results_dir/report.md" -nt "$marker" ]]; then
    echo
    sed -n '/^## Targets/,/^## qlora_linear ratios/p' "$results_dir/report.md" | grep '^|'
fi
echo "results: ${results_json:-none}"

stamp=$(basename "${results_json:-$(date +%Y%m%d-%H%M).json}" .json)
sleep 1  # let tee write the last lines
cp "$LOG" "$results_dir/gpu_check-$stamp.log"
if [[ -n "${OUT:-}" ]]; then
    # $OUT takes at most 8 files: the log (written there all along), the JSON, report.md and up to 5 plots.
    for f in ${results_json:+"$results_json"} "$results_dir/report.md"; do
        if [[ -f "$f" ]]; then cp "$f" "$OUT/"; fi
    done
    find "$results_dir" -name 'tflops_*.png' -newer "$marker" | sort | head -n 5 | xargs -r cp -t "$OUT/"
fi
exit "$FAILED"
