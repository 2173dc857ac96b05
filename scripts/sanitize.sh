#!/usr/bin/env bash
# The CPU kernels under AddressSanitizer + UndefinedBehaviorSanitizer.
#
#   scripts/sanitize.sh [pytest args...]     (default: the kernel, bad-input, fuzz and concurrency tests)
#
# Builds fourbit with FOURBIT_SANITIZE=ON and FOURBIT_CUDA=OFF into its own build directory (build/asan) and its own
# package directory (build/asan/site), never touching the editable development install: the tests then import that
# copy (PYTHONPATH first, the editable install's import hook told to step aside with SKBUILD_EDITABLE_SKIP) with libasan
# preloaded into Python (torch itself is not instrumented, so the runtime must come first). Leak detection is off:
# CPython and torch keep allocations alive until exit by design. Any sanitizer report aborts the process, which
# fails the run. The last result is written to build/asan/last_result.txt.
#
# Environment: PYTHON (default /work/venv/bin/python, else python3), FUZZ_SECONDS (extra time-bounded fuzz run
# under the sanitizers after the tests, default 0), SANITIZE_SKIP_BUILD=1 (reuse the last build).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PYTHON=${PYTHON:-$( [ -x /work/venv/bin/python ] && echo /work/venv/bin/python || command -v python3 )}
BUILD=$REPO/build/asan
SITE=$BUILD/site
LOCK=${FOURBIT_BUILD_LOCK:-/tmp/fourbit_build.lock}
mkdir -p "$BUILD"
log() { echo "[sanitize $(date +%H:%M:%S)] $*"; }

if [ "${SANITIZE_SKIP_BUILD:-0}" != "1" ]; then
  log "building the sanitized CPU extension in $BUILD (lock $LOCK)"
  # -fno-sanitize=vptr: torch's classes come from uninstrumented libraries, whose type info the vptr check cannot
  # see (false reports). -fno-sanitize-recover: undefined behaviour aborts instead of printing and going on.
  extra="-g -fno-sanitize=vptr -fno-sanitize-recover=all"
  rm -rf "$BUILD/dist"
  if ! flock "$LOCK" env FOURBIT_CUDA=OFF FOURBIT_SANITIZE=ON "$PYTHON" -m pip wheel --no-build-isolation --no-deps \
      -q -w "$BUILD/dist" -C build-dir="$BUILD/cmake" -C cmake.define.CMAKE_CXX_FLAGS="$extra" \
      -C cmake.build-type=RelWithDebInfo "$REPO" >"$BUILD/build.log" 2>&1; then
    tail -n 40 "$BUILD/build.log"
    log "BUILD FAILED"
    echo "build failed $(date -u +%FT%TZ)" >"$BUILD/last_result.txt"
    exit 2
  fi
  rm -rf "$SITE" && mkdir -p "$SITE"
  "$PYTHON" -m zipfile -e "$BUILD"/dist/fourbit-*.whl "$SITE"
fi

# The whole sanitizer runtime environment, shared by the tests and the fuzz run.
# The editable install's import hook steps aside for the build directories listed in SKBUILD_EDITABLE_SKIP.
SKBUILD_EDITABLE_SKIP=$(ls -d "$REPO"/build/cp3* 2>/dev/null | paste -sd:)
export SKBUILD_EDITABLE_SKIP
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
# detect_container_overflow=0: std::vector annotations disagree between instrumented and uninstrumented code.
# protect_shadow_gap=0: torch's CUDA libraries (loaded even without a GPU) map memory there.
export ASAN_OPTIONS=detect_leaks=0:detect_container_overflow=0:protect_shadow_gap=0:abort_on_error=1:halt_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export FOURBIT_ASAN=1

so=$(ls "$SITE"/fourbit/_C*.so)
libs=$(ldd "$so")
if ! grep -q libasan <<<"$libs" || ! grep -q libubsan <<<"$libs"; then
  log "$so is not linked against libasan and libubsan: not a sanitizer build"; exit 2
fi
where=$("$PYTHON" -c "import fourbit, torch; print(fourbit.__file__); \
p, s = fourbit.quantize_4bit(torch.randn(1000)); print(fourbit.dequantize_4bit(p, s).shape)" 2>&1) || {
  echo "$where" | tail -n 30; log "the sanitized build does not import"; exit 2; }
case "$where" in
  "$SITE"/*) log "testing $(echo "$where" | head -n 1)" ;;
  *) echo "$where"; log "imported the wrong fourbit (expected one under $SITE)"; exit 2 ;;
esac

if [ $# -eq 0 ]; then
  set -- tests/test_quantize.py tests/test_ops.py tests/test_codebook.py tests/test_quant_state.py \
    tests/test_bad_input.py tests/test_bad_input_matrix.py tests/test_matmul.py tests/test_lora_linear.py \
    tests/test_linear4bit.py tests/test_fake_quant.py tests/test_linear_int.py tests/test_fuzz.py \
    tests/test_concurrency.py
fi
start=$(date +%s)
"$PYTHON" -m pytest -q -p no:cacheprovider "$@" 2>&1 | tee "$BUILD/pytest.log" | tail -n 15
rc=${PIPESTATUS[0]}
summary=$(grep -E "passed|failed|error" "$BUILD/pytest.log" | tail -n 1)
fuzz_rc=0
if [ "${FUZZ_SECONDS:-0}" -gt 0 ]; then
  log "fuzzing for ${FUZZ_SECONDS}s under the sanitizers"
  "$PYTHON" scripts/fuzz.py --seconds "$FUZZ_SECONDS" 2>&1 | tee "$BUILD/fuzz.log" | tail -n 8
  fuzz_rc=${PIPESTATUS[0]}
  summary="$summary; fuzz: $(tail -n 1 "$BUILD/fuzz.log")"
fi
sanitizer_reports=$(grep -cE "ERROR: AddressSanitizer|runtime error:" "$BUILD/pytest.log" "$BUILD/fuzz.log" 2>/dev/null \
  | awk -F: '{s += $NF} END {print s + 0}')
result="$(date -u +%FT%TZ) pytest exit $rc, fuzz exit $fuzz_rc, $(($(date +%s) - start)) s, sanitizer reports: \
$sanitizer_reports; $summary"
echo "$result" | tee "$BUILD/last_result.txt"
[ "$rc" -eq 0 ] && [ "$fuzz_rc" -eq 0 ] && [ "$sanitizer_reports" -eq 0 ]
