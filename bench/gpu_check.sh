#!/usr/bin/env bash
# One run on a GPU machine (an H200 with its own torch): build for sm_90 only, run every CUDA test and the GPU
# benchmarks, print a short table last. Logs go under $OUT (the device tool brings that folder back).
#   bash bench/gpu_check.sh
# Prepared on the CPU machine; see bench/GPU_NOTES.md for what each run showed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fourbit-gpu-check}
mkdir -p "$OUT"
log() { echo "[gpu_check $(date +%H:%M:%S)] $*"; }

log "machine: $(nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null)"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" | tee "$OUT/env.txt"

log "build (sm_90 only, against this machine's torch)"
if ! FOURBIT_CUDA=ON FOURBIT_CUDA_ARCHS=90 pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
  tail -n 40 "$OUT/build.log"; log "BUILD FAILED"; exit 1
fi
python -m fourbit info | tee "$OUT/info.txt"

log "CUDA tests (CPU vs CUDA byte equality, matmul, errors, opcheck)"
python -m pytest tests/test_cuda.py -q -x -p no:cacheprovider >"$OUT/test_cuda.log" 2>&1
tests_rc=$?
tail -n 3 "$OUT/test_cuda.log"

log "QAT CUDA tests (fake_quantize / fake_quantize_4bit / LinearInt against the CPU kernels)"
python -m pytest tests/test_fake_quant.py tests/test_linear_int.py tests/test_qat.py -q -p no:cacheprovider \
  -k "cuda" >"$OUT/test_qat_cuda.log" 2>&1
qat_rc=$?
tail -n 3 "$OUT/test_qat_cuda.log"
[ $tests_rc -eq 0 ] && tests_rc=$qat_rc

log "other CUDA tests (adapters, prompt tuning, large tensors with 64-bit indexing, device-mismatch errors)"
python -m pytest tests/test_adapters.py tests/test_prompt_tuning.py tests/test_large.py tests/test_bad_input_matrix.py \
  -q -p no:cacheprovider -k "cuda or device or gpu" >"$OUT/test_other_cuda.log" 2>&1
other_rc=$?
tail -n 3 "$OUT/test_other_cuda.log"
[ $tests_rc -eq 0 ] && tests_rc=$other_rc

if command -v compute-sanitizer >/dev/null 2>&1; then
  log "compute-sanitizer memcheck on a small case"
  compute-sanitizer --tool memcheck --error-exitcode 3 python -c "
import torch, fourbit
for n in (1, 63, 4097):
    x = torch.randn(n, device='cuda')
    for nested in (False, True):
        p, s = fourbit.quantize_4bit(x, 64, compress_statistics=nested)
        fourbit.dequantize_4bit(p, s, torch.bfloat16)
        fourbit.fake_quantize_4bit(x.bfloat16(), 'nf4', 64, nested)
    xg = torch.randn(n, 32, device='cuda', requires_grad=True)
    sc = torch.rand(n, 1, device='cuda', requires_grad=True)
    fourbit.fake_quantize(xg, sc, torch.zeros(n, 1, device='cuda'), -8, 7, group_size=32).sum().backward()
torch.cuda.synchronize()
print('memcheck workload done')" >"$OUT/sanitizer.log" 2>&1
  echo "compute-sanitizer exit: $?" | tee -a "$OUT/sanitizer.log"
  tail -n 2 "$OUT/sanitizer.log"
fi

log "benchmarks (device copy bandwidth first, then the kernels)"
python - <<'PY' 2>&1 | tee "$OUT/ceilings.txt"
import torch
from fourbit import benchmark
dev = torch.device("cuda")
n = 1 << 28  # 1 GiB of fp32 per buffer, far above the L2
src, dst = torch.empty(n, device=dev), torch.empty(n, device=dev)
a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
cases = [
    benchmark.Case("device copy_ 1 GiB", lambda i: dst.copy_(src), bytes_moved=2 * 4 * n),
    benchmark.Case("bf16 matmul 8192^3", lambda i: a @ a),
]
res = benchmark.run_cases(cases, dev, repeats=11)
print(f"copy bandwidth: {res[0].gbps:.0f} GB/s; bf16 matmul: {2 * 8192**3 / (res[1].fourbit_ms * 1e-3) / 1e12:.0f} TFLOP/s")
PY
python -m fourbit bench --device cuda --suite quant --json "$OUT/bench_quant_cuda.json" >"$OUT/bench_quant_cuda.txt" 2>&1
log "QAT kernels against torch's fake-quant ops and quantize+dequantize composed (4096 x 4096)"
python -m fourbit bench --device cuda --suite qat --json "$OUT/bench_qat_cuda.json" >"$OUT/bench_qat_cuda.txt" 2>&1
tail -n 16 "$OUT/bench_qat_cuda.txt"
log "matmul_4bit batch 1 on 4096 x 14336 bf16 against cuBLAS (the spec's target: >= 3.0x)"
python - <<'PY' 2>&1 | tee "$OUT/bench_matmul_cuda.txt"
import torch, fourbit
from fourbit import benchmark
dev = torch.device("cuda")
n, k = 14336, 4096
copies = benchmark.rotations(n * k // 2, dev)
dense = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) / 64 for _ in range(copies)]
quant = [fourbit.quantize_4bit(w, 64, compress_statistics=True) for w in dense]
x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
cases = [benchmark.Case("matmul_4bit bf16 batch 1 4096x14336",
                        lambda i: fourbit.matmul_4bit(x, *quant[i % copies]),
                        {"cuBLAS bf16": lambda i: torch.nn.functional.linear(x, dense[i % copies])},
                        bytes_moved=n * k // 2, target=("cuBLAS bf16", 3.0))]
cases += benchmark.matmul_cases(dev, shape=(4096, 4096), layers=16, dtypes=(torch.bfloat16,), batches=(1, 16, 4096))
print(benchmark.format_table(benchmark.run_cases(cases, dev)))
PY
tail -n 8 "$OUT/bench_quant_cuda.txt"
log "QLoRA layers against dense LoRA (batch 1 through 16 layers, forward+backward at 16 and 512; bf16 and fp32)"
python -m fourbit bench --device cuda --suite lora --json "$OUT/bench_lora_cuda.json" >"$OUT/bench_lora_cuda.txt" 2>&1
tail -n 10 "$OUT/bench_lora_cuda.txt"

# ---------------------------------------------------------------- distributed QLoRA (fourbit.distributed, NCCL)
# FSDP2 on NCCL over every GPU present (world size 1 on a one-GPU machine): logits and adapter gradients against
# an unsharded copy, then tokens/s and per-rank memory, one process vs FSDP2 (bf16 compute).
ngpu=$(python -c "import torch; print(torch.cuda.device_count())")
log "distributed: FSDP2 check and benchmark on NCCL, world size $ngpu"
python -m torch.distributed.run --nproc-per-node "$ngpu" bench/bench_distributed.py --device cuda --check \
  >"$OUT/distributed_check.txt" 2>&1
dist_rc=$?
grep "distributed check" "$OUT/distributed_check.txt" || tail -n 20 "$OUT/distributed_check.txt"
[ $dist_rc -eq 0 ] || tests_rc=$dist_rc
dist_shape=(--hidden 2048 --intermediate 5632 --layers 8 --heads 16 --vocab 32000 --seq 512 --batch 8 --steps 10 --bf16)
{ python bench/bench_distributed.py --device cuda --mode single "${dist_shape[@]}" &&
  python -m torch.distributed.run --nproc-per-node "$ngpu" bench/bench_distributed.py --device cuda --mode fsdp \
    "${dist_shape[@]}"; } 2>&1 | grep "^|" | tee "$OUT/bench_distributed_cuda.txt"
# ---------------------------------------------------------------- end of the distributed section

log "done (tests exit $tests_rc)"
exit $tests_rc
