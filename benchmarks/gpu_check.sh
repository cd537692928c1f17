#!/usr/bin/env bash
# The one GPU check (run through the device tool, from the repo root): build and install the
# package from source, run every test (the cuda-marked ones execute there), then the benchmarks.
# Logs and CSV/JSON tables land in $OUT/gpu_check-<stage>/ and, bundled, in $OUT/gpu_check-<stage>.tgz
# (the device tool brings back at most 8 files). Copy the numbers, with the device name, date and
# commit, into benchmarks/RESULTS.md.
#
#   bash benchmarks/gpu_check.sh [all|tests|sanitizer|bench] [BENCHMARK... | PYTEST_ARG...]
#
# One device command may run 10 minutes at most: if `all` does not fit, run `tests`, then within
# the machine's 30 s warm window (the in-place build is kept) `sanitizer` and `bench`, or `bench`
# with a subset of gates diff_linear switch model_step inference (the default: all five).
# `tests` runs the cuda-marked tests (those CI cannot run) first, then the rest; arguments after
# `tests` go to both pytest runs instead (e.g. test files, to finish a run that timed out).
# Time: everything timed ends GPU_CHECK_BUDGET seconds (default 520) after the script started,
# build included, so that the logs and the bundle are written before the device tool's limit (600 s,
# less when less device time is left: set the budget ~80 s under the run's limit); a command killed
# by the tool brings back at most 8 of its files. TESTS_TIMEOUT, SANITIZER_TIMEOUT and BENCH_TIMEOUT
# cap a stage within that budget. A stopped pytest gets SIGINT, so it still prints what failed so
# far (SIGTERM would leave a log of dots). bench_diff_linear rewrites its
# CSV/JSON after each shape for the same reason, and BENCH_ARGS (e.g. "--shapes 4096x4096,4096x11008",
# with one benchmark named) finishes what a stopped run left out.
set -uo pipefail
STAGE=${1:-all}
case "$STAGE" in all|tests|sanitizer|bench) ;;
    *) echo "usage: gpu_check.sh [all|tests|sanitizer|bench] [BENCHMARK... | PYTEST_ARG...]" >&2; exit 2 ;; esac
shift $(( $# > 0 ? 1 : 0 ))
BENCHMARKS=${*:-gates diff_linear switch model_step inference}
PYTEST_ARGS=()
[ "$STAGE" = tests ] && PYTEST_ARGS=("$@")
BASE_OUT=${OUT:-benchmarks/out}
OUT="$BASE_OUT/gpu_check-$STAGE"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
runs() { [ "$STAGE" = all ] || [ "$STAGE" = "$1" ]; }  # whether this call runs the stage $1
BUDGET=${GPU_CHECK_BUDGET:-520}  # seconds since the start (bash's SECONDS) by which every timed step ends
left() { echo $(( $1 - SECONDS > 1 ? $1 - SECONDS : 1 )); }  # seconds until the deadline $1 (at least 1)
deadline_in() { echo $(( SECONDS + $1 < BUDGET ? SECONDS + $1 : BUDGET )); }  # $1 s from now, within the budget
stop_at() { timeout -s INT -k 10 "$(left "$1")" "${@:2}"; }  # run until the deadline $1; SIGINT, then SIGKILL
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
# The device gets the working tree without .git: pass DPKERNELS_COMMIT=<hash> to stamp the rows.
echo "commit ${DPKERNELS_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}" | tee -a "$OUT/gpu.txt"
# In place (-e): the tests import the source tree, so the CUDA extension must sit there too. A
# `bench` stage right after `tests` on the same machine finds it built and skips the build.
if runs tests || ! python3 -c "import dpkernels._C" 2>/dev/null; then
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
if runs tests; then
    # conftest.py sets DPKERNELS_AUTOTUNE=0 (one tile per fused kernel; each tile is tested once).
    # Triton's compiles, one process each, bound the run: pytest-xdist (in the device image)
    # spreads the tests over TEST_WORKERS processes sharing the GPU (the suite passes under xdist).
    workers=()
    python3 -c "import xdist" 2>/dev/null && workers=(-n "${TEST_WORKERS:-8}")
    deadline=$(deadline_in "${TESTS_TIMEOUT:-$BUDGET}")
    for marks in cuda "not cuda"; do
        log="$OUT/tests-${marks// /-}.log"
        if (( deadline - SECONDS < 10 )); then  # not run: a failure, with its reason in the log
            echo "no time left (TESTS_TIMEOUT or GPU_CHECK_BUDGET): the tests marked '$marks' did not run" | tee "$log"; status=1; continue
        fi
        # -rfEs: failures and errors named in the summary, then the skips (-r keeps only its last value)
        stop_at "$deadline" python3 -m pytest -q -rfEs --durations=30 "${workers[@]}" -m "$marks" \
            "${PYTEST_ARGS[@]}" 2>&1 \
            | tee "$log" | tail -n 60
        code=${PIPESTATUS[0]}
        [ "$code" = 0 ] || [ "$code" = 5 ] || status=1  # 5: the arguments select no test of these marks
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
if runs bench; then
    deadline=$(deadline_in "${BENCH_TIMEOUT:-$BUDGET}")
    for name in $BENCHMARKS; do  # the LoRA rows of model_step and inference need peft (the bench extra)
        # shellcheck disable=SC2086  # BENCH_ARGS: options for the benchmark(s) named, word-split
        stop_at "$deadline" python3 -m "benchmarks.bench_$name" --out "$OUT" ${BENCH_ARGS:-} 2>&1 \
            | tee "$OUT/bench_$name.log" || status=1
    done
    # The plots and suite table from the rows, and DESIGN.md's targets judged from them (both rerun
    # at home on unpacked bundles: python -m benchmarks --replot --out DIR; python -m benchmarks.targets DIR...).
    timeout 30 python3 -m benchmarks --replot --out "$OUT" > "$OUT/suite.log" 2>&1 || status=1
    timeout 15 python3 -m benchmarks.targets "$OUT" 2>&1 | tee "$OUT/targets.md" || status=1
fi
tar -C "$BASE_OUT" -czf "$BASE_OUT/gpu_check-$STAGE.tgz" "gpu_check-$STAGE" && rm -rf "$OUT"
exit $status
