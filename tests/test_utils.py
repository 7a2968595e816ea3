"""Shared helpers: the fast BLAS, atomic writes, JSONL limits, the one-line error boundary."""

import os
import platform
import subprocess
import sys

import pytest

import blas
import utils
from utils import UserError


linux_only = pytest.mark.skipif(platform.system() != "Linux", reason="macOS uses Accelerate")

MATMUL = "import utils, mlx.core as mx; mx.eval(mx.ones((64, 64)) @ mx.ones((64, 64)))"


def library_binding(symbol, importer, env=None):
    """The file that the dynamic linker binds `importer`'s `symbol` to when a fresh process
    imports utils (the BLAS) and runs one MLX float32 matmul: its LD_DEBUG=bindings record."""
    out = subprocess.run([sys.executable, "-c", MATMUL], capture_output=True, text=True,
                         env={**os.environ, **(env or {}), "LD_DEBUG": "bindings"}, check=True).stderr
    for line in out.splitlines():
        if importer in line and f"`{symbol}'" in line and " to " in line:
            return line.split(" to ")[1].split(" [")[0]
    raise AssertionError(f"no binding of {symbol} from {importer} seen")


@linux_only
def test_mlx_sgemm_runs_in_scipy_openblas_through_the_forwards():
    """setup.sh builds _blas_forwarding.so; MLX's cblas_sgemm must reach scipy-openblas32's."""
    assert blas.PATH == blas.FORWARDING, f"the forwarding library is not loaded ({blas.PATH}): run setup.sh"
    assert os.path.realpath(library_binding("cblas_sgemm", "libmlx.so")) == os.path.realpath(blas.FORWARDING)
    assert library_binding("scipy_cblas_sgemm", "_blas_forwarding.so").endswith("libscipy_openblas.so")


@linux_only
def test_the_binding_check_sees_a_fallback_to_the_reference_blas():
    """The check above fails when MLX's matmul runs in the BLAS its wheel bundles."""
    assert "mlx_cpu.libs/libblas" in library_binding("cblas_sgemm", "libmlx.so", {"MLX_LORA_BLAS": "none"})


@linux_only
def test_the_blas_runs_kernels_made_for_this_cpu():
    info = blas.describe()
    assert info["library"] == "scipy-openblas32" and info["version"].startswith("OpenBLAS 0.3.")
    assert blas.generic_kernel_warning(info["core"], blas.cpu_flags()) is None, info


def test_generic_kernels_on_a_newer_cpu_are_said(monkeypatch):
    monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
    assert "Prescott" in blas.generic_kernel_warning("Prescott", {"avx2", "avx512f"})
    assert "Haswell" in blas.generic_kernel_warning("Haswell", {"avx2", "avx512f"})
    assert blas.generic_kernel_warning("Haswell", {"avx2"}) is None
    assert blas.generic_kernel_warning("SapphireRapids", {"avx2", "avx512f"}) is None
    assert blas.generic_kernel_warning("Cooperlake", {"avx2", "avx512f"}) is None  # what OpenBLAS says
    assert blas.generic_kernel_warning("SKYLAKEX", {"avx2", "avx512f"}) is None  # a build for one CPU
    assert blas.generic_kernel_warning("Prescott", {"sse3"}) is None


def test_a_core_chosen_by_openblas_coretype_is_the_users(monkeypatch):
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Prescott")
    assert blas.generic_kernel_warning("Prescott", {"avx2", "avx512f"}) is None


def test_a_slow_mlx_matmul_is_said_with_its_remedy(monkeypatch):
    monkeypatch.setattr(blas, "matmul_GFLOPs", lambda: (30.0, 230.0))
    monkeypatch.setattr(blas, "describe", lambda: {})  # MLX's reference BLAS
    speed, warning = blas.check_matmul_speed()
    assert "MLX 30 GFLOP/s" in speed and "numpy 230 GFLOP/s" in speed and "reference BLAS" in speed
    assert warning.startswith("warning: MLX's matmul runs at 13% of numpy's") and "setup.sh" in warning
    monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
    monkeypatch.setattr(blas, "cpu_flags", lambda: {"avx2", "avx512f"})
    monkeypatch.setattr(blas, "describe", lambda: {"library": "x", "version": "OpenBLAS 0.3.21", "core": "Prescott"})
    assert "setup.sh" in blas.check_matmul_speed()[1]
    # the right kernels, yet slow: a busy machine, not a missing library
    monkeypatch.setattr(blas, "describe", lambda: {"library": "x", "version": "OpenBLAS 0.3.34", "core": "SkylakeX"})
    assert "another process" in blas.check_matmul_speed()[1]
    monkeypatch.setattr(blas, "matmul_GFLOPs", lambda: (200.0, 230.0))
    assert len(blas.check_matmul_speed()) == 1


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with utils.atomic_write(str(target), "w") as f:
            f.write("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]  # no temporary left behind


def test_atomic_write_replaces_on_success(tmp_path):
    target = tmp_path / "out.txt"
    with utils.atomic_write(str(target), "w") as f:
        f.write("new")
    assert target.read_text() == "new"
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(target).st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_jsonl_line_limit_and_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert [n for n, _ in utils.read_jsonl(str(path))] == [1, 3]
    path.write_text('{"a": 1}\n{"a": "' + "x" * 200 + '"}\n')
    with pytest.raises(UserError, match="line 2: longer than 100 bytes"):
        list(utils.read_jsonl(str(path), max_line_bytes=100))


def test_run_script_turns_user_and_os_errors_into_one_line(tmp_path):
    script = ("import utils\n"
              "def main():\n"
              "    open(%r + '/missing/x', 'w')\n"
              "utils.run_script(main)\n") % str(tmp_path)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(utils.__file__)))
    assert run.returncode == 2
    assert run.stderr.startswith("error: ") and "missing/x" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
