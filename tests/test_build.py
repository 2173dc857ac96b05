# SPDX-License-Identifier: Apache-2.0
"""What the installed build contains: the compiled extension, its CUDA kernels where CI expects them, the CLI."""

import os
import subprocess
import sys
from pathlib import Path

import torch

import fourbit

REPO = Path(__file__).resolve().parents[1]


def test_tests_run_against_the_installed_package():
    # The source lives in python/fourbit; an installed (non-editable) package lives in site-packages. CI installs the
    # wheel and sets FOURBIT_TEST_INSTALLED=1 so that a test run against the source tree cannot pass for it.
    extension = Path(fourbit._C.__file__).resolve()
    assert extension.exists() and Path(fourbit._build_info.__file__).exists()
    if os.environ.get("FOURBIT_TEST_INSTALLED") == "1":
        for path in (Path(fourbit.__file__).resolve(), extension):
            for source in (REPO / "python", REPO / "build"):
                assert source not in path.parents, f"fourbit imported from the source tree: {path}"


def test_cuda_kernels_compiled_when_ci_expects_them():
    # CI sets FOURBIT_EXPECT_CUDA=1 whenever nvcc is present: a build that silently skipped CUDA fails here.
    info = fourbit.build_info()
    if os.environ.get("FOURBIT_EXPECT_CUDA") == "1":
        assert info["cuda_kernels"], f"CUDA kernels were not compiled: {info['cuda_skipped_reason']}"
        assert "sm_80" in info["cuda_archs"] and "sm_90" in info["cuda_archs"], info["cuda_archs"]
        assert torch._C._dispatch_has_kernel_for_dispatch_key("fourbit::quantize_4bit", "CUDA")
    if info["cuda_kernels"]:
        for op in ("quantize_4bit", "dequantize_4bit_into", "double_quantize", "dequantize_absmax"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fourbit::{op}", "CUDA"), op
    # dequantize_4bit allocates and calls dequantize_4bit_into, once for every backend.
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fourbit::dequantize_4bit", "CompositeExplicitAutograd")


def test_build_info_records_the_torch_it_was_built_against():
    info = fourbit.build_info()
    assert info["torch_built"].split(".")[:2] == torch.__version__.split(".")[:2]
    assert info["cpu_isa"] in info["cpu_isas_supported"]
    assert info["cpu_isas_supported"][-1] == "scalar"


def test_info_command_prints_the_build():
    out = subprocess.run([sys.executable, "-m", "fourbit", "info"], capture_output=True, text=True, check=True).stdout
    assert f"fourbit {fourbit.__version__}" in out
    assert f"torch {torch.__version__}" in out
    assert "CUDA kernels:" in out and "CPU instruction set:" in out


def test_forcing_an_unknown_isa_is_a_clear_error():
    env = dict(os.environ, FOURBIT_CPU_ISA="neon9000")
    code = "import fourbit, torch; fourbit.quantize_4bit(torch.ones(64))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 1
    assert "ValueError" in proc.stderr and "FOURBIT_CPU_ISA must be one of" in proc.stderr and "neon9000" in proc.stderr
