"""convert: convert.py on a synthetic checkpoint in a subprocess, its memory sampled: time and peak
memory (see bench.py's docstring)."""

import math
import os
import shutil
import sys
import tempfile
import time

from utils import UserError

from benchmarks.fixtures import SIZES, write_synthetic_checkpoint, write_synthetic_hf_checkpoint
from benchmarks.harness import GiB, ROOT, disk_bytes, run_sampled
from models import NAMES


def run(args):
    size = args.size
    params = SIZES[size]
    n_params = sum(math.prod(s) for s in NAMES.shapes(params).values())
    out_bytes = n_params * {"float16": 2, "bfloat16": 2, "float32": 4}[args.dtype]
    need = n_params * 2 + out_bytes + 2 * GiB  # input + output + slack
    root = os.path.abspath(args.dir or tempfile.gettempdir())
    free = shutil.disk_usage(root).free
    if free < need:
        raise UserError(f"{root}: needs {need / GiB:.1f} GiB free, has {free / GiB:.1f} GiB (use --dir)")
    work = tempfile.mkdtemp(prefix="bench-convert-", dir=root)
    try:
        src, out = os.path.join(work, "source"), os.path.join(work, "mlx")
        os.makedirs(src)
        t0 = time.perf_counter()
        (write_synthetic_hf_checkpoint if args.layout == "hf" else write_synthetic_checkpoint)(src, params)
        gen_seconds = time.perf_counter() - t0
        in_size = disk_bytes(src)
        cmd = [sys.executable, os.path.join(ROOT, "convert.py"), "--hf-path", src, "--mlx-path", out,
               "--dtype", args.dtype, "--format", args.format]
        if args.quantize:
            cmd += ["-q", "--q-bits", str(args.q_bits), "--q-group-size", str(args.q_group_size)]
        code, seconds, peaks, rusage = run_sampled(cmd)
        if code != 0:
            raise UserError(f"convert.py exited with {code}")
        out_size = disk_bytes(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "key": f"convert-{args.layout}-{size}-{args.dtype}" + (f"-q{args.q_bits}" if args.quantize else ""),
        "size": size, "layout": args.layout, "params": n_params, "dtype": args.dtype, "format": args.format,
        "quantize": f"{args.q_bits}-bit/g{args.q_group_size}" if args.quantize else None,
        "input_GB": round(in_size / 1e9, 2), "output_GB": round(out_size / 1e9, 2),
        "write_input_s": round(gen_seconds, 1), "convert_s": round(seconds, 1),
        "convert_cpu_s": round(rusage.ru_utime + rusage.ru_stime, 1),
        "throughput_GB_per_s": round(in_size / 1e9 / seconds, 2),
        "peak_RssAnon_GiB": round(peaks["RssAnon"] / GiB, 3),
        "peak_RssFile_GiB": round(peaks["RssFile"] / GiB, 3),
        "peak_VmHWM_GiB": round(peaks["VmHWM"] / GiB, 3),
        "under_2GiB_anon": peaks["RssAnon"] < 2 * GiB,
    }


def add_args(p):
    p.add_argument("--size", default="7b", choices=list(SIZES), help="Checkpoint shape: 7b (14.5 GB) or medium (0.3 GB).")
    p.add_argument("--layout", default="meta", choices=["meta", "hf"],
                   help="Meta's consolidated.00.pth, or a Hugging Face folder of safetensors shards.")
    p.add_argument("--dir", default=None, help="Where to write the temporary checkpoint and output (default: the temp dir).")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"], help="convert.py --dtype.")
    p.add_argument("--format", default="npz", choices=["npz", "safetensors"], help="convert.py --format.")
    p.add_argument("-q", "--quantize", action="store_true", help="Pass -q to convert.py.")
    p.add_argument("--q-bits", type=int, default=4, help="convert.py --q-bits.")
    p.add_argument("--q-group-size", type=int, default=64, help="convert.py --q-group-size.")
