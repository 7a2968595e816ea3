"""machine: this machine's ceilings: float32 matmul (MLX's BLAS and numpy's), memory bandwidth."""

import blas

from benchmarks.harness import best_time


def memory_probes():
    """Two ways of moving 512 MiB, each returning the bytes it counts: a numpy copy,
    counted as STREAM does (bytes read plus bytes written), and numpy's dot of the array
    with itself (its BLAS, every core), bytes read only. Decoding only reads weights,
    and reading alone runs slower here than a copy counted as STREAM does: the read is
    the ceiling a decoding step can reach."""
    import numpy as np

    src = np.ones(2**27, np.float32)
    dst = src.copy()  # its pages faulted in before any copy is timed

    def copy():
        np.copyto(dst, src)
        return 2 * src.nbytes

    def read():
        src.dot(src)
        return src.nbytes

    return copy, read


def best_GBs(probe):
    """A probe's GB/s at its best of five (after a first run)."""
    return probe() / best_time(probe) / 1e9


def run(args):
    """This machine's own ceilings: float32 matmul through MLX's BLAS (which library, which
    kernels) and numpy's own, memory bandwidth."""
    mlx_matmul, numpy_matmul = blas.matmul_GFLOPs()
    copy, read = memory_probes()
    return {"key": "machine", "blas": blas.describe(), "mlx_matmul_GFLOPs": round(mlx_matmul, 1),
            "numpy_matmul_GFLOPs": round(numpy_matmul, 1),
            "copy_bandwidth_GBs": round(best_GBs(copy), 1), "read_bandwidth_GBs": round(best_GBs(read), 1)}


def add_args(p):
    """machine has no options."""
