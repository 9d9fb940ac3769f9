"""A CUDA kernel's translation unit (as cuda_compile builds it) compiled for the CPU with clang and
run: the test's `main` plays the grid, setting blockIdx and threadIdx and calling the kernel."""

import shutil
import subprocess

import pytest

CLANG = shutil.which("clang++") or shutil.which("clang")
needs_clang = pytest.mark.skipif(CLANG is None, reason="clang not found (Debian/Ubuntu: apt-get install clang)")


def run_on_cpu(tmp_path, unit: str, kernel: str, prelude: str, main: str) -> None:
    """Build `prelude + unit + main` (KERNEL names the kernel) against empty CUDA headers and run it;
    a failed build or a non-zero exit (main's verdict) fails the test with what it printed."""
    for h in ("cuda_fp16.h", "cuda_bf16.h"):
        (tmp_path / h).write_text("#pragma once\n")
    src = tmp_path / f"{kernel}.cpp"
    src.write_text(prelude + unit + f"#define KERNEL {kernel}\n" + main)
    exe = tmp_path / kernel
    res = subprocess.run(
        [CLANG, "-x", "c++", "-std=c++17", "-O1", "-I", str(tmp_path), str(src), "-o", str(exe)], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
