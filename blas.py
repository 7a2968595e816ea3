"""The BLAS under MLX's float32 matmuls on Linux: chosen, loaded before mlx.core, reported.

MLX's CPU wheel bundles the reference BLAS, about 40x slower than a tuned one. A library
loaded into the global symbol scope before `mlx.core` is imported takes its place: MLX's
`cblas_sgemm` then resolves to it. `utils` imports this module first, so every script
gets it. The choice, most preferred first:
  1. MLX_LORA_BLAS=/path/to/lib.so names one; MLX_LORA_BLAS=none keeps MLX's own.
  2. _blas_forwarding.so (built by setup.sh from blas_forwarding/): scipy-openblas32, the
     current OpenBLAS that numpy ships, whose prefixed names it forwards. It knows
     today's CPUs; a distribution's older OpenBLAS falls back to generic kernels on them.
  3. Intel MKL from PyPI, then a distribution's OpenBLAS.
Whatever is loaded is asked which kernels it runs, and a generic choice on a CPU with
AVX2 or AVX-512 is said on stderr. OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE, where a user
or the machine sets them, are left to OpenBLAS and never set here.
"""

import ctypes
import glob
import os
import platform
import site
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
FORWARDING = os.path.join(ROOT, "_blas_forwarding.so")
SYSTEM_OPENBLAS = [
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
]
# OpenBLAS's x86 kernel sets by the instructions they use, lower-cased (a DYNAMIC_ARCH build
# says "Cooperlake", a build for one CPU "SKYLAKEX"): a CPU with those instructions that gets
# a core outside its set runs kernels slower than it could.
AVX512_CORES = {"skylakex", "cooperlake", "sapphirerapids"}
AVX2_CORES = AVX512_CORES | {"haswell", "zen", "excavator"}

PATH = None  # the library loaded
_handle = None


def _mkl_candidates():
    # PyPI's `mkl` puts libmkl_rt in the environment's (or the user's) lib folder.
    return [path for prefix in (sys.prefix, site.getuserbase())
            for path in sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")))]


def _candidates():
    explicit = os.environ.get("MLX_LORA_BLAS")
    if explicit:
        return [] if explicit == "none" else [explicit]
    return [path for path in [FORWARDING] + _mkl_candidates() + SYSTEM_OPENBLAS if os.path.exists(path)]


def _load():
    global PATH, _handle
    if platform.system() != "Linux":
        return  # macOS: MLX uses Accelerate and Metal already
    if "mlx.core" in sys.modules:
        # Too late: MLX's symbols are already bound to the reference BLAS.
        print("warning: blas imported after mlx.core; the fast BLAS is not loaded", file=sys.stderr)
        return
    for path in _candidates():  # the first that loads: a moved venv breaks the forwarding's link
        # A BLAS's idle threads otherwise spin between calls (OpenBLAS: 2^28 cycles, about 0.1 s),
        # on a core the CPU kernels' threads need next: bfloat16 products ran 2x slower.
        if "mkl_rt" in path:
            os.environ.setdefault("KMP_BLOCKTIME", "0")
        else:
            os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # the least: 2^4 cycles
        try:
            _handle = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            print(f"warning: could not load the BLAS {path}: {e} (rerun setup.sh)", file=sys.stderr)
            continue
        PATH = path
        break
    else:
        return
    warning = generic_kernel_warning(describe().get("core"), cpu_flags())
    if warning:
        print(f"warning: {warning}", file=sys.stderr)


def _string_function(name):
    function = getattr(_handle, name, None)
    if function is None:
        return None
    function.restype = ctypes.c_char_p
    function.argtypes = []
    return function().decode(errors="replace").strip()


def describe():
    """{"library", "version", "core"} of the BLAS loaded (empty without one): which
    kernels it runs here is what decides MLX's float32 matmul speed."""
    if _handle is None:
        return {}
    if hasattr(_handle, "mlx_lora_blas_corename"):  # the forwarding library, however it was named
        config, core = _string_function("mlx_lora_blas_config"), _string_function("mlx_lora_blas_corename")
        return {"library": "scipy-openblas32", "version": " ".join(config.split()[:2]), "core": core}
    if _string_function("openblas_get_config") is not None:
        return {"library": PATH, "version": " ".join(_string_function("openblas_get_config").split()[:2]),
                "core": _string_function("openblas_get_corename")}
    mkl = getattr(_handle, "mkl_get_version_string", None)
    if mkl is not None:
        buffer = ctypes.create_string_buffer(256)
        mkl(buffer, ctypes.c_int(len(buffer)))
        return {"library": PATH, "version": buffer.value.decode(errors="replace").strip(), "core": None}
    return {"library": PATH, "version": None, "core": None}


def _cpuinfo():
    """The first processor's fields in /proc/cpuinfo (empty where there is none)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_flags():
    """The instruction-set flags of this CPU (empty where /proc/cpuinfo has none)."""
    return set(_cpuinfo().get("flags", "").split())


def cpu_name():
    """This CPU as benchmarks name it: its model name, family and model number."""
    info = _cpuinfo()
    name = info.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in info and "model" in info:
        name += f" (family {info['cpu family']} model {info['model']})"
    return name


def generic_kernel_warning(core, flags):
    """A sentence when OpenBLAS runs kernels older than this CPU's instructions, else None.
    A core the user chose with OPENBLAS_CORETYPE is theirs to choose."""
    if not core or os.environ.get("OPENBLAS_CORETYPE"):
        return None
    name = core.lower()
    if ("avx512f" in flags and name not in AVX512_CORES) or ("avx2" in flags and name not in AVX2_CORES):
        return (f"{PATH} runs OpenBLAS's {core} kernels, older than this CPU: MLX's float32 matmuls run "
                "several times slower than they could (a newer OpenBLAS knows it: pip install -U "
                "scipy-openblas32, then rerun setup.sh)")
    return None


def matmul_GFLOPs(n=2048, rounds=5):
    """MLX's and numpy's float32 n x n matmul, GFLOP/s at the best of `rounds` each, in this
    process: numpy ships its own current OpenBLAS, the yardstick for MLX's. The two take
    turns, so that a moment when the machine runs slower costs both alike."""
    import time

    import mlx.core as mx
    import numpy as np

    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    a_mx = mx.array(a)
    products = [lambda: mx.eval(a_mx @ a_mx), lambda: a @ a]
    best = [float("inf")] * len(products)
    for round_ in range(rounds + 1):  # round 0 warms up: page faults, the BLAS's threads
        for i, product in enumerate(products):
            tic = time.perf_counter()
            product()
            if round_:
                best[i] = min(best[i], time.perf_counter() - tic)
    return tuple(2 * n**3 / seconds / 1e9 for seconds in best)


SLOW_FRACTION = 0.7  # MLX's matmul below this fraction of numpy's is said, with the remedy


def check_matmul_speed():
    """The lines setup.sh prints: MLX's float32 matmul beside numpy's, and the remedy in
    one line when MLX's is slow. Returns them."""
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        return [f"MLX computes on {mx.default_device()}: its matmuls do not use the BLAS"]
    mlx_speed, numpy_speed = matmul_GFLOPs()
    info = describe()
    used = (f"{info['library']} {info.get('version') or ''}, {info.get('core') or 'its own'} kernels"
            if info else "MLX's bundled reference BLAS")
    lines = [f"float32 matmul 2048^2: MLX {mlx_speed:.0f} GFLOP/s ({used}), numpy {numpy_speed:.0f} GFLOP/s"]
    if mlx_speed < SLOW_FRACTION * numpy_speed:
        lines.append(f"warning: MLX's matmul runs at {mlx_speed / numpy_speed:.0%} of numpy's: {_remedy(info)}")
    return lines


def _remedy(info):
    """What to do about a slow MLX matmul, by what is loaded."""
    if not info or generic_kernel_warning(info.get("core"), cpu_flags()):
        return ("run setup.sh with a C compiler and CMake (it builds _blas_forwarding.so for scipy-openblas32), "
                "or point MLX_LORA_BLAS at a BLAS that knows this CPU")
    return ("its BLAS runs kernels made for this CPU, so another process may have held the cores: measure "
            "again with `python bench.py machine`")


_load()
