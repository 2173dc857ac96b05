#!/usr/bin/env bash
# The build configurations CI does not cover, each in a throwaway virtual environment under $WORK:
#   1. the CPU-only torch 2.13.0: CPU kernels only, tests of the quantization kernels pass;
#   2. a CUDA build of torch (2.14.1) with no nvcc on PATH: CPU kernels only, with the reason recorded;
#   3. `pip wheel .`, then the wheel installed into a fresh virtual environment: it imports and quantizes.
# Takes several minutes (three torch installs and three builds). Prints PASS/FAIL per configuration.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
WORK=${WORK:-/tmp/fourbit-check-builds}
rm -rf "$WORK" && mkdir -p "$WORK"
status=0
report() { if [ "$2" -eq 0 ]; then echo "PASS $1"; else echo "FAIL $1 (log: $3)"; status=1; fi; }

smoke='import fourbit, torch
info = fourbit.build_info(); print(info)
p, s = fourbit.quantize_4bit(torch.randn(100, 64), compress_statistics=True)
assert fourbit.dequantize_4bit(p, s).shape == (100, 64)'

# 1. CPU-only torch 2.13.0
(
  set -e
  python3 -m venv "$WORK/cpu" && . "$WORK/cpu/bin/activate"
  pip install -q torch==2.13.0 scikit-build-core ninja pytest hypothesis "bitsandbytes==0.50.2" safetensors
  pip install -q --no-build-isolation --no-deps -C build-dir="$WORK/build-cpu" "$REPO"
  python -c "$smoke
assert not info['cuda_kernels'] and 'CPU-only' in info['cuda_skipped_reason'], info"
  cd "$REPO" && python -m pytest -q -p no:cacheprovider tests/test_quantize.py tests/test_codebook.py tests/test_build.py
) >"$WORK/cpu.log" 2>&1
report "CPU-only torch 2.13.0" $? "$WORK/cpu.log"

# 2. CUDA torch without nvcc
(
  set -e
  python3 -m venv "$WORK/nonvcc" && . "$WORK/nonvcc/bin/activate"
  pip install -q torch==2.14.1 scikit-build-core ninja
  export PATH=$(echo "$PATH" | tr ":" "\n" | grep -v -e cuda -e /usr/local/bin | paste -sd:)
  export CUDACXX=/nonexistent/nvcc  # also hides toolkits CMake would find in default places (/usr/local/cuda)
  ! command -v nvcc
  pip install -q --no-build-isolation --no-deps -C build-dir="$WORK/build-nonvcc" "$REPO" 2>&1 | tee "$WORK/nonvcc-build.log"
  python -c "$smoke
assert not info['cuda_kernels'] and 'nvcc' in info['cuda_skipped_reason'], info"
) >"$WORK/nonvcc.log" 2>&1
report "CUDA torch 2.14.1 without nvcc" $? "$WORK/nonvcc.log"

# 3. pip wheel . -> fresh venv
(
  set -e
  . "$WORK/nonvcc/bin/activate"
  export PATH=$(echo "$PATH" | tr ':' '\n' | grep -v -e cuda -e /usr/local/bin | paste -sd:)
  export CUDACXX=/nonexistent/nvcc
  pip wheel -q --no-build-isolation --no-deps -C build-dir="$WORK/build-nonvcc" -w "$WORK/dist" "$REPO"
  deactivate
  python3 -m venv "$WORK/wheel" && . "$WORK/wheel/bin/activate"
  pip install -q torch==2.14.1 "$WORK"/dist/fourbit-*.whl
  cd "$WORK" && python -c "$smoke" && python -m fourbit info
) >"$WORK/wheel.log" 2>&1
report "pip wheel . installs and imports in a fresh venv" $? "$WORK/wheel.log"

echo "check_builds finished $(date -u +%Y-%m-%dT%H:%MZ) with status $status"
exit $status
