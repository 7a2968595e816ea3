"""fuse: a synthetic 7B-shaped model given random adapters, fused and exported by fuse.py: time and
peak memory."""

import math
import os
import shutil
import sys
import tempfile

from utils import UserError

from benchmarks.fixtures import SIZES, write_random_adapters, write_synthetic_hf_checkpoint
from benchmarks.harness import GiB, ROOT, disk_bytes, run_sampled
from models import NAMES


def run_fuse(model_dir, adapter_file, out, fmt, extra=()):
    """fuse.py as a user runs it, its memory sampled: (seconds, peaks, its check line)."""
    cmd = [sys.executable, os.path.join(ROOT, "fuse.py"), "--model", model_dir, "--adapter-file", adapter_file,
           "--save-path", out, "--format", fmt, *extra]
    log = out + ".log"
    with open(log, "w") as f:
        code, seconds, peaks, _ = run_sampled(cmd, stderr=f)
    with open(log) as f:
        lines = f.read().splitlines()
    os.remove(log)
    if code != 0:
        raise UserError(f"fuse.py exited with {code}: {lines[-1] if lines else ''}")
    return seconds, peaks, next((line for line in lines if line.startswith("check:")), "")


def run(args):
    """A synthetic 7B-shaped (Llama: no sliding window) model converted, given random adapters,
    then fused and exported by fuse.py, which checks the export: time and peak memory."""
    params = {k: v for k, v in SIZES[args.size].items() if k != "sliding_window"}
    n_params = sum(math.prod(s) for s in NAMES.shapes(params).values())
    root = os.path.abspath(args.dir or tempfile.gettempdir())
    need = n_params * (2 + 2 + 4) + 2 * GiB  # bf16 source, the base folder, the export (float32 at most)
    if shutil.disk_usage(root).free < need:
        raise UserError(f"{root}: needs {need / GiB:.1f} GiB free (use --dir)")
    work = tempfile.mkdtemp(prefix="bench-fuse-", dir=root)
    results = {"key": f"fuse-{args.size}" + ("-q4" if args.quantize else ""), "params": n_params,
               "base": "4-bit (g64)" if args.quantize else "float16"}
    try:
        src, base = os.path.join(work, "source"), os.path.join(work, "base")
        os.makedirs(src)
        write_synthetic_hf_checkpoint(src, params)
        cmd = [sys.executable, os.path.join(ROOT, "convert.py"), "--hf-path", src, "--mlx-path", base,
               "--dtype", "float16", "--format", "safetensors"] + (["-q"] if args.quantize else [])
        if run_sampled(cmd)[0] != 0:
            raise UserError("convert.py failed")
        shutil.rmtree(src)
        adapter_file = os.path.join(work, "adapters.npz")
        write_random_adapters(adapter_file, params)
        for fmt in args.formats:
            out = os.path.join(work, "fused.gguf" if fmt == "gguf" else "fused")
            seconds, peaks, check = run_fuse(base, adapter_file, out, fmt)
            results[f"{fmt}_s"] = round(seconds, 1)
            results[f"{fmt}_GB"] = round(disk_bytes(out) / 1e9, 2)
            results[f"{fmt}_peak_RssAnon_GiB"] = round(peaks["RssAnon"] / GiB, 3)
            results[f"{fmt}_check"] = check
            if os.path.isdir(out):
                shutil.rmtree(out)
            else:
                os.remove(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def add_args(p):
    p.add_argument("--size", default="7b", choices=list(SIZES), help="Model shape: 7b or medium.")
    p.add_argument("--dir", default=None, help="Where to write the temporary models (default: the temp dir).")
    p.add_argument("-q", "--quantize", action="store_true", help="A 4-bit base (QLoRA), re-quantized when fused.")
    p.add_argument("--formats", nargs="+", default=["mlx", "hf", "gguf"], choices=["mlx", "hf", "gguf"],
                   help="fuse.py --format values to run.")
