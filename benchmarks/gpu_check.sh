#!/usr/bin/env bash
# The one GPU check (run through the device tool, from the repo root): build and install the
# package from source, run every test (the cuda-marked ones execute there), then the benchmarks.
# Logs and CSV/JSON tables land in $OUT/gpu_check-<stage>/ and, bundled, in $OUT/gpu_check-<stage>.tgz
# (the device tool brings back at most 8 files). Copy the numbers, with the device name, date and
# commit, into benchmarks/RESULTS.md.
#
#   bash benchmarks/gpu_check.sh [all|tests|sanitizer|bench|quick] [BENCHMARK... | PYTEST_ARG...]
#
# `quick` fits one call of a 15-minute device session (GPU_CHECK_BUDGET default 500 s, machine start
# not included): the build, the cuda-marked tests that tests/_quick.py picks (DPKERNELS_QUICK=1:
# every GPU kernel at a small and at a real shape; TESTS_TIMEOUT caps them, default 240 s), then
# the headline rows only (the quick block below) and targets.md. Its steps share the time left: each
# ends at its share of what remains before the budget, so one that ends early leaves its time to
# the later ones and one that overruns is stopped (SIGINT) before it eats theirs.
# One device command may run 10 minutes at most: if `all` does not fit, run `tests`, then within
# the machine's 30 s warm window (the in-place build is kept) `sanitizer` and `bench`, or `bench`
# with a subset of gates diff_linear switch model_step inference (the default: all five).
# `tests` runs the cuda-marked tests (those CI cannot run) first, then the rest; arguments after
# `tests` go to both pytest runs instead (e.g. test files, to finish a run that timed out).
# Time: everything timed ends GPU_CHECK_BUDGET seconds (default 520, quick 500) after the script started,
# build included, so that the logs and the bundle are written before the device tool's limit (600 s,
# less when less device time is left: set the budget ~80 s under the run's limit); a command killed
# by the tool brings back at most 8 of its files. TESTS_TIMEOUT, SANITIZER_TIMEOUT and BENCH_TIMEOUT
# cap a stage within that budget. A stopped pytest gets SIGINT, so it still prints what failed so
# far (SIGTERM would leave a log of dots). bench_diff_linear rewrites its
# CSV/JSON after each shape for the same reason, and BENCH_ARGS (e.g. "--shapes 4096x4096,4096x11008",
# with one benchmark named) finishes what a stopped run left out.
set -uo pipefail
STAGE=${1:-all}
case "$STAGE" in all|tests|sanitizer|bench|quick) ;;
    *) echo "usage: gpu_check.sh [all|tests|sanitizer|bench|quick] [BENCHMARK... | PYTEST_ARG...]" >&2; exit 2 ;; esac
shift $(( $# > 0 ? 1 : 0 ))
if [ "$STAGE" = quick ] && [ $# -gt 0 ]; then echo "gpu_check.sh quick takes no arguments" >&2; exit 2; fi
BENCHMARKS=${*:-gates diff_linear switch model_step inference}
PYTEST_ARGS=()
[ "$STAGE" = tests ] && PYTEST_ARGS=("$@")
BASE_OUT=${OUT:-benchmarks/out}
OUT="$BASE_OUT/gpu_check-$STAGE"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
runs() { [ "$STAGE" = all ] || [ "$STAGE" = "$1" ]; }  # whether this call runs the stage $1
# Seconds since the start (bash's SECONDS) by which every timed step ends.
if [ "$STAGE" = quick ]; then BUDGET=${GPU_CHECK_BUDGET:-500}; else BUDGET=${GPU_CHECK_BUDGET:-520}; fi
left() { echo $(( $1 - SECONDS > 1 ? $1 - SECONDS : 1 )); }  # seconds until the deadline $1 (at least 1)
deadline_in() { echo $(( SECONDS + $1 < BUDGET ? SECONDS + $1 : BUDGET )); }  # $1 s from now, within the budget
stop_at() { timeout -s INT -k 10 "$(left "$1")" "${@:2}"; }  # run until the deadline $1; SIGINT, then SIGKILL
# share WEIGHT LATER: the deadline of a step given WEIGHT parts of the time left, the later steps LATER parts.
share() { echo $(( SECONDS + (BUDGET - SECONDS) * $1 / ($1 + $2) )); }
# stopped CODE LOG: when CODE is a stopped step's (timeout's 124, or 137 after SIGKILL), LOG says so.
stopped() {
    if [ "$1" = 124 ] || [ "$1" = 137 ]; then
        echo "gpu_check: $(basename "$2" .log) stopped at its deadline (GPU_CHECK_BUDGET or a stage's TIMEOUT)" \
            | tee -a "$2"
    fi
}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
# The device gets the working tree without .git: pass DPKERNELS_COMMIT=<hash> to stamp the rows.
echo "commit ${DPKERNELS_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}" | tee -a "$OUT/gpu.txt"
# In place (-e): the tests import the source tree, so the CUDA extension must sit there too. A
# `bench` stage right after `tests` on the same machine finds it built and skips the build.
if runs tests || [ "$STAGE" = quick ] || ! python3 -c "import dpkernels._C" 2>/dev/null; then
    DPKERNELS_BUILD_CUDA=1 DPKERNELS_CUDA_ARCHS=${DPKERNELS_CUDA_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-16} \
        python3 -m pip install --no-build-isolation --no-deps --no-index -q -e . 2>&1 | tee "$OUT/install.log" \
        || status=1
fi
python3 -m dpkernels info | tee -a "$OUT/gpu.txt"
# The device has no network. Its image already holds peft (the LoRA rows of bench_model_step and
# bench_inference): PEFT_WHEEL names a carried wheel only to test another version.
if [ -n "${PEFT_WHEEL:-}" ]; then
    python3 -m pip install --no-deps --no-index -q "$PEFT_WHEEL" 2>&1 | tee -a "$OUT/install.log" || status=1
fi
# conftest.py sets DPKERNELS_AUTOTUNE=0 (one tile per fused kernel; each tile is tested once).
# Triton's compiles, one process each, bound the run: pytest-xdist (in the device image)
# spreads the tests over TEST_WORKERS processes sharing the GPU (the suite passes under xdist).
workers=()
python3 -c "import xdist" 2>/dev/null && workers=(-n "${TEST_WORKERS:-8}")
run_tests() {  # run_tests MARKS DEADLINE: pytest over the tests of those marks, stopped at the deadline
    local marks=$1 deadline=$2 log="$OUT/tests-${1// /-}.log" code
    if (( deadline - SECONDS < 10 )); then  # not run: a failure, with its reason in the log
        echo "no time left (TESTS_TIMEOUT or GPU_CHECK_BUDGET): the tests marked '$marks' did not run" | tee "$log"
        status=1
        return
    fi
    # -rfEs: failures and errors named in the summary, then the skips (-r keeps only its last value)
    stop_at "$deadline" python3 -m pytest -q -rfEs --durations=30 "${workers[@]}" -m "$marks" \
        "${PYTEST_ARGS[@]}" 2>&1 \
        | tee "$log" | tail -n 60
    code=${PIPESTATUS[0]}
    stopped "$code" "$log"
    [ "$code" = 0 ] || [ "$code" = 5 ] || status=1  # 5: the arguments select no test of these marks
}
if runs tests; then
    deadline=$(deadline_in "${TESTS_TIMEOUT:-$BUDGET}")
    for marks in cuda "not cuda"; do
        run_tests "$marks" "$deadline"
    done
fi
if runs sanitizer; then
    # The extension's GPU tests (valid and bad inputs) once more under compute-sanitizer's memcheck,
    # without torch's caching allocator: its 512-byte blocks in 2 MB segments would hide small overruns.
    sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
    if [ -x "$sanitizer" ]; then
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 stop_at "$(deadline_in "${SANITIZER_TIMEOUT:-$BUDGET}")" \
            "$sanitizer" --tool memcheck --error-exitcode 1 \
            python3 -m pytest -q -rfEs tests/test_cuda_ext.py -k TestOnGPU 2>&1 | tee "$OUT/sanitizer.log" \
            | tail -n 15 || status=1
    else
        echo "compute-sanitizer not found: memcheck skipped" | tee "$OUT/sanitizer.log"
    fi
fi
# The plots and suite table from the rows, and DESIGN.md's targets judged from them (both rerun
# at home on unpacked bundles: python -m benchmarks --replot --out DIR; python -m benchmarks.targets DIR...).
judge_rows() {
    timeout 15 python3 -m benchmarks.targets "$OUT" 2>&1 | tee "$OUT/targets.md" || status=1
    timeout 30 python3 -m benchmarks --replot --out "$OUT" > "$OUT/suite.log" 2>&1 || status=1
}
run_bench() {  # run_bench NAME DEADLINE ARG...: python -m benchmarks.bench_NAME into $OUT, stopped at the deadline
    local name=$1 deadline=$2 code; shift 2
    stop_at "$deadline" python3 -m "benchmarks.bench_$name" --out "$OUT" "$@" 2>&1 | tee "$OUT/bench_$name.log"
    code=${PIPESTATUS[0]}
    stopped "$code" "$OUT/bench_$name.log"
    [ "$code" = 0 ] || status=1
}
if runs bench; then
    deadline=$(deadline_in "${BENCH_TIMEOUT:-$BUDGET}")
    for name in $BENCHMARKS; do  # the LoRA rows of model_step and inference need peft (the bench extra)
        # shellcheck disable=SC2086  # BENCH_ARGS: options for the benchmark(s) named, word-split
        run_bench "$name" "$deadline" ${BENCH_ARGS:-}
    done
    judge_rows
fi
if [ "$STAGE" = quick ]; then
    # The cuda-marked tests that tests/_quick.py picks; then the rows DESIGN.md's headline targets
    # are judged on: the layer at M = 8192 (<= 1.10x nn.Linear; fixed-mask <= 0.8x) and M = 512
    # (<= 2.0x) on the auto (triton), unfused and fused paths, the gate kernels against copy_ at
    # 4096x11008, one BERT-large task switch. Weights: tests 10, diff_linear 6, gates 1, switch 3,
    # and 1 left for targets.md and the plots.
    export DPKERNELS_QUICK=1
    deadline=$(share 10 11) cap=$(( SECONDS + ${TESTS_TIMEOUT:-240} ))
    run_tests cuda $(( deadline < cap ? deadline : cap ))
    ext=""  # the extension's gate rows where it built (the targets judge them beside triton's)
    python3 -c "import dpkernels._C" 2>/dev/null && ext=",cuda"
    run_bench diff_linear "$(share 6 5)" --layers 8192x4096x11008,512x4096x4096 \
        --providers nn.Linear,triton,triton-unfused,triton-fused,fixed-mask
    run_bench gates "$(share 1 4)" --shapes 4096x11008 --providers "triton$ext,copy"
    run_bench switch "$(share 3 1)" --providers triton
    judge_rows
fi
tar -C "$BASE_OUT" -czf "$BASE_OUT/gpu_check-$STAGE.tgz" "gpu_check-$STAGE" && rm -rf "$OUT"
exit $status
