"""distributed and accumulation: lora.py's main job on several ranks, or in micro-batches."""

import os
import shutil
import sys
import tempfile

import utils
from utils import UserError

from benchmarks.harness import ROOT, add_main_job_args, run_on_ranks


ALL_REDUCE_SCRIPT = """
import sys, time, numpy as np, mlx.core as mx
group = mx.distributed.init(strict=True)
vector = mx.ones((int(sys.argv[1]),))
times = []
for _ in range(int(sys.argv[2])):
    tic = time.perf_counter()
    mx.eval(mx.distributed.all_sum(vector, group=group))
    times.append(time.perf_counter() - tic)
if group.rank() == 0:
    print("ALL_REDUCE_MS", 1000 * float(np.median(times[2:])))
"""


def main_job_training(args, folder, n_ranks=1, accumulation=1):
    """lora.py on the default model for args.steps steps: (loss tokens per second of its reports
    after the first, which holds compilation; rank 0's peak memory in GB; adapter values)."""
    import numpy as np

    adapter_file = os.path.join(folder, f"ranks{n_ranks}-accumulation{accumulation}", "adapters.npz")
    command = [sys.executable, os.path.join(ROOT, "lora.py"), "--model", args.model, "--train", "--data", args.data,
               "--adapter-file", adapter_file, "--iters", str(args.steps), "--batch-size", str(args.batch_size),
               "--grad-accumulation-steps", str(accumulation), "--max-seq-length", str(args.max_seq_length),
               "--lora-rank", str(args.rank), "--lora-targets", args.targets, "--learning-rate", "1e-3",
               "--steps-per-report", str(args.steps // 3), "--steps-per-eval", str(10 * args.steps),
               "--val-batches", "1"]
    codes, _, err = run_on_ranks(n_ranks, command)
    if any(codes) or not os.path.exists(adapter_file):
        raise UserError(f"lora.py on {n_ranks} rank(s) failed: {err.strip().splitlines()[-1:]}")
    reports = [r for _, r in utils.read_jsonl(os.path.splitext(adapter_file)[0] + ".metrics.jsonl")
               if "tokens_per_s" in r]
    n_values = sum(v.size for v in utils.load_arrays(adapter_file, "adapter file").values())
    return (round(float(np.median([r["tokens_per_s"] for r in reports[1:]])), 1),
            round(max(r["peak_memory_gb"] for r in reports), 2), n_values)


def run_distributed(args):
    """The default model's LoRA steps as one process with both cores against two ranks of one core
    each (ring over loopback), the same global batches; and the all_sum of one step's gradients
    (every adapter value, float32) between the two ranks."""
    if shutil.which("taskset") is None:
        return {"key": "distributed", "skipped": "needs taskset (util-linux)"}
    results = {"key": "distributed", "model": "SmolLM2-135M-Instruct", "batch_size": args.batch_size,
               "max_seq_length": args.max_seq_length, "rank": args.rank, "targets": args.targets}
    with tempfile.TemporaryDirectory() as tmp:
        for n_ranks, label in ((1, "one_process_2_threads"), (2, "two_ranks_1_thread")):
            results[f"{label}_tokens_per_s"], _, n_values = main_job_training(args, tmp, n_ranks)
    _, out, _ = run_on_ranks(2, [sys.executable, "-c", ALL_REDUCE_SCRIPT, str(n_values), "22"])
    ms = [float(line.split()[1]) for line in out.splitlines() if line.startswith("ALL_REDUCE_MS")]
    results["gradient_mb_per_step"] = round(4 * n_values / 1e6, 2)
    results["all_reduce_ms_per_step"] = round(ms[0], 2) if ms else None
    return results


def run_accumulation(args):
    """One batch of the main job's QLoRA as one step and as --grad-accumulation-steps micro-batches:
    peak memory (the activations of one micro-batch at a time) and loss tokens per second."""
    results = {"key": "accumulation", "model": "SmolLM2-135M-Instruct", "batch_size": args.batch_size,
               "max_seq_length": args.max_seq_length, "rank": args.rank, "targets": args.targets}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, args.micro_batches):
            speed, peak, _ = main_job_training(args, tmp, accumulation=n)
            results[f"accumulation_{n}_tokens_per_s"], results[f"accumulation_{n}_peak_memory_gb"] = speed, peak
    return results


def add_accumulation_args(p):
    add_main_job_args(p)
    p.set_defaults(batch_size=16)
    p.add_argument("--micro-batches", type=int, default=4, help="--grad-accumulation-steps against 1.")
    p.add_argument("--steps", type=int, default=6, help="Training steps of each run (the first third untimed).")


def add_distributed_args(p):
    add_main_job_args(p)
    p.add_argument("--steps", type=int, default=15, help="Training steps of each run (the first third untimed).")
