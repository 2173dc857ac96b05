# SPDX-License-Identifier: Apache-2.0
import os

import pytest
import torch

import fourbit

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
CPU_ISAS = fourbit._C.supported_cpu_isas()
GPU_SKIP_REASON = "needs a CUDA GPU (runs in bench/gpu_check.sh)"
HAS_GPU = torch.cuda.is_available() and fourbit.cuda_kernels_built()

requires_gpu = pytest.mark.skipif(not HAS_GPU, reason=GPU_SKIP_REASON)


def dtype_id(dtype):
    return DTYPE_IDS[dtype]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=CPU_ISAS)
def cpu_isa(request, monkeypatch):
    """Runs the test once per CPU instruction set this machine supports (FOURBIT_CPU_ISA)."""
    monkeypatch.setenv("FOURBIT_CPU_ISA", request.param)
    assert fourbit._C.cpu_isa() == request.param
    return request.param




def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """In CI (FOURBIT_CI=1) a skip for any reason but a missing GPU fails the run: tests never skip silently."""
    if os.environ.get("FOURBIT_CI") != "1":
        return
    bad = []
    for report in terminalreporter.stats.get("skipped", []):
        reason = str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if GPU_SKIP_REASON not in reason:
            bad.append(f"{report.nodeid}: {reason}")
    if bad:
        terminalreporter.write_line("FOURBIT_CI: skips other than the missing-GPU skip are failures:", red=True)
        for line in bad:
            terminalreporter.write_line("  " + line, red=True)
        terminalreporter._session.exitstatus = 1
