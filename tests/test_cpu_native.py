"""The CPU's native loops (mergekit_mlx/kernels/cpu_native.py): built by the system's compiler, cached,
and never worse than numpy's passes: without a compiler, after a failed build or a failed
first-use check, numpy's passes run and the merge is the same. (That the loops give numpy's bits
is the business of tests/test_kernels.py, whose test_cpu_* tests run both.)"""

import os
import stat

import mlx.core as mx
import numpy as np
import pytest

from mergekit_mlx import errors
from mergekit_mlx import kernels as K
from mergekit_mlx.kernels import cpu_native, task_merge_cpu

DEFINES = (("T", "uint16_t"), ("KM", "2"), ("MODES", "2,3"), ("CONSENSUS", "1"), ("NORMALIZE", "1"))


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty build cache and no built or checked variants in this process."""
    monkeypatch.setenv("MERGEKIT_MLX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(errors, "_warned", set())
    cpu_native.forget_checks()
    cpu_native.forget_builds()
    yield tmp_path
    cpu_native.forget_builds()


def merged(seed=3):
    rng = np.random.default_rng(seed)
    base = mx.array(rng.standard_normal(40_000) * 0.02).astype(mx.bfloat16)
    others = [(base.astype(mx.float32) + mx.array(rng.standard_normal(40_000) * 0.003)).astype(mx.bfloat16) for _ in range(2)]
    with mx.stream(mx.cpu):
        out = K.fused_task_merge(
            base,
            others,
            [0.6, 0.4],
            sparsify="random",
            densities=[0.5, 0.7],
            rescale=True,
            consensus="sum",
            normalize=True,
            lam=1.0,
            seed=11,
        )
        return np.array(out.view(mx.uint16))


def failing_compiler(path) -> str:
    """A 'C++ compiler' that answers --version and fails every build."""
    script = path / "fake-c++"
    script.write_text(
        '#!/bin/sh\nif [ "$1" = "--version" ]; then echo "fake 1.0"; exit 0; fi\necho \'error: no such target\' >&2\nexit 1\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_a_variant_is_built_once_and_cached_on_disk(fresh):
    if cpu_native.compiler() is None:
        pytest.skip("no C++ compiler here")
    assert cpu_native.checked("task_merge", DEFINES, 2, task_merge_cpu.check_native_merge) is not None
    built = list((fresh / "cache" / "cpu").glob("task_merge-*.so"))
    assert len(built) == 1
    cpu_native.forget_builds()
    mtime = built[0].stat().st_mtime_ns
    assert cpu_native.library("task_merge", DEFINES, 2) is not None  # loaded, not built again
    assert built[0].stat().st_mtime_ns == mtime


def test_without_a_compiler_numpy_merges_the_same(fresh, monkeypatch):
    want = merged()
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setenv("PATH", str(fresh))  # nothing named c++, g++ or clang++ on it
    cpu_native.compiler.cache_clear()
    assert cpu_native.compiler() is None
    assert cpu_native.checked("task_merge", DEFINES, 2, task_merge_cpu.check_native_merge) is None
    np.testing.assert_array_equal(merged(), want)


def test_a_failed_build_warns_once_and_numpy_runs(fresh, monkeypatch):
    want = merged()
    built = set((fresh / "cache" / "cpu").glob("*.so"))
    cpu_native.forget_builds()
    cpu_native.forget_checks()
    monkeypatch.setenv("CXX", failing_compiler(fresh))
    cpu_native.compiler.cache_clear()
    with pytest.warns(RuntimeWarning, match="building the native CPU 'task_merge' failed.*no such target"):
        assert cpu_native.checked("task_merge", DEFINES, 2, task_merge_cpu.check_native_merge) is None
    with pytest.warns(RuntimeWarning, match="building the native CPU 'l1_lanes' failed"):
        np.testing.assert_array_equal(merged(), want)
    assert set((fresh / "cache" / "cpu").glob("*.so")) == built  # nothing half-built is left to be loaded


def test_a_variant_that_disagrees_with_numpy_is_not_used(fresh, monkeypatch):
    if cpu_native.compiler() is None:
        pytest.skip("no C++ compiler here")
    disagrees = lambda fn, d, k: False  # noqa: E731
    with pytest.warns(RuntimeWarning, match="native CPU 'task_merge' disagrees with numpy"):
        assert cpu_native.checked("task_merge", DEFINES, 2, disagrees) is None


def test_switched_off_by_the_environment(fresh, monkeypatch):
    monkeypatch.setenv("MERGEKIT_MLX_NO_NATIVE", "1")
    assert cpu_native.library("task_merge", DEFINES, 2) is None
    assert not os.path.exists(fresh / "cache" / "cpu")


# ---------------- NaN/Inf in one native pass (kernels/nonfinite.cpp) ----------------

SPECIAL = {  # float dtype -> bit patterns of +Inf, a +NaN, -Inf, a -NaN, the largest finite, -0
    mx.bfloat16: (np.uint16, [0x7F80, 0x7FC1, 0xFF80, 0xFFFF, 0x7F7F, 0x8000]),
    mx.float16: (np.uint16, [0x7C00, 0x7E01, 0xFC00, 0xFFFF, 0x7BFF, 0x8000]),
    mx.float32: (np.uint32, [0x7F800000, 0x7FC00001, 0xFF800000, 0xFFFFFFFF, 0x7F7FFFFF, 0x80000000]),
}


def finite_bits(dtype, size: int, rng) -> np.ndarray:
    """The bit patterns of `size` finite values of `dtype`, of both signs and many exponents."""
    x = rng.standard_normal(size).astype(np.float32) * np.float32(2.0) ** rng.integers(-10, 10, size).astype(np.float32)
    if dtype == mx.bfloat16:
        return (x.view(np.uint32) >> 16).astype(np.uint16)  # truncated: still finite
    return x.astype(np.float16).view(np.uint16) if dtype == mx.float16 else x.view(np.uint32)


@pytest.mark.parametrize("dtype", list(SPECIAL), ids=str)
@pytest.mark.parametrize("size", [1, 15, 16, 17, 1000, 65_537])
def test_the_native_finiteness_check_agrees_with_numpy_at_every_position(fresh, dtype, size):
    from mergekit_mlx.kernels import finite_cpu

    rng = np.random.default_rng(size)
    assert finite_cpu.all_finite([mx.array(finite_bits(dtype, size, rng)).view(dtype)]) is True
    for where in sorted({0, size // 2, size - 1}):
        for bad in SPECIAL[dtype][1]:
            bits = finite_bits(dtype, size, rng)
            bits[where] = bad
            x = mx.array(bits).view(dtype)
            expected = bool(np.all(np.isfinite(np.array(x.astype(mx.float32)))))
            assert finite_cpu.all_finite([x]) == expected, (size, where, hex(bad))
    assert cpu_native.library("nonfinite", finite_cpu._defines(dtype), 1) is not None  # the native loop ran


def test_the_native_finiteness_check_declines_what_it_does_not_read(fresh, monkeypatch):
    """float64 (and integers) are left to the MLX graph; so is everything without the native loop."""
    from mergekit_mlx.kernels import finite_cpu

    with mx.stream(mx.cpu):
        assert finite_cpu.all_finite([mx.array(np.ones(4)).astype(mx.float64)]) is None
    assert finite_cpu.all_finite([mx.zeros((0,), dtype=mx.float32), mx.ones((3,))]) is True
    with K.use_kernels(False):  # --no-kernels: the plain MLX graph checks
        assert finite_cpu.all_finite([mx.ones((3,))]) is None
    monkeypatch.setenv("MERGEKIT_MLX_NO_NATIVE", "1")
    assert finite_cpu.all_finite([mx.ones((3,))]) is None
