"""Benchmarks, one subcommand per script measured; results print as a table and go to a JSON file.

    python bench.py                  ALL below in one run (3-4 min on a 2-core Xeon): machine; convert
                                     --size medium, 7b, and 7b --layout hf; train --size tiny and
                                     medium, each with --qlora; generate
    python bench.py machine          MLX's and numpy's float32 matmul, the BLAS's kernels, memory bandwidth
    python bench.py convert [--size 7b|medium] [--layout meta|hf] [--dir /tmp] [--dtype float16] [-q]
    python bench.py train [--size tiny|medium] [--qlora]    float32 and bfloat16 products, and PyTorch
    python bench.py generate [--size medium] [--kinds float32,float16,8-bit,4-bit] [--samples 16]
    python bench.py peft [--batches 12]     the default model's LoRA/QLoRA against PyTorch + PEFT
    python bench.py families [--size medium] [--families qwen3,gemma2]   each family's LoRA against PEFT
    python bench.py qa [--model FOLDER] [--adapter-file adapters/adapters.npz] [--samples 30]
    python bench.py fuse [--size 7b] [--formats mlx hf gguf] [-q]    fuse and export: time, peak memory
    python bench.py llamacpp         the main job's GGUF exports through llama.cpp (llama-cpp-python)
    python bench.py distributed      two ranks of one thread against one process of two
    python bench.py accumulation     one batch as one step and as micro-batches: memory, speed

MLX_LORA_CPU_KERNELS=0 in the environment measures plain MLX, without cpu_kernels/.

The sections live in benchmarks/, one module each (benchmarks/__init__.py lists them).

convert: writes a synthetic 7B-shaped bf16 checkpoint in Mistral's layout (dim
4096, 32 layers, hidden 14336, 32 heads, 8 KV heads, vocab 32000; about 14.5 GB),
runs convert.py on it in a subprocess while sampling the child's /proc status
every 50 ms, reports time and peak memory, then deletes everything. The memory
that matters is RssAnon: pages of the memory-mapped input are reclaimable page
cache, which VmHWM and ru_maxrss count but RssAnon does not.
"""

import argparse
import os
import time

import blas  # noqa: F401  (first: the fast BLAS before any section imports mlx.core)
from utils import read_json, run_script, write_json

from benchmarks import conversion, families, fusing, generation, machine, peft_compare, preference, ranks, training
from benchmarks.evaluations import llamacpp, qa
from benchmarks.harness import ROOT, print_table, stamp

SECTIONS = {
    "machine": (machine.add_args, machine.run, "MLX's and numpy's matmul GFLOP/s, memory copy and read bandwidth."),
    "convert": (conversion.add_args, conversion.run, "Convert a synthetic checkpoint; peak memory and time."),
    "train": (training.add_args, training.run, "LoRA / QLoRA training speed on a random model."),
    "generate": (generation.add_args, generation.run, "Prompt and decode tokens/s for float32/16, 8- and 4-bit."),
    "families": (families.add_args, families.run,
                 "A LoRA step of each family's architecture (~150M, random) against PyTorch + PEFT."),
    "peft": (peft_compare.add_args, peft_compare.run,
             "The default model's LoRA and QLoRA steps against PyTorch + PEFT."),
    "preference": (preference.add_args, preference.run,
                   "A DPO and an ORPO step against supervised steps on the same pairs (random model)."),
    "qa": (qa.add_args, qa.run, "Greedy chat answers to dataset questions, before and after fine-tuning."),
    "fuse": (fusing.add_args, fusing.run, "Fuse and export a synthetic 7B-shaped model; peak memory and time."),
    "llamacpp": (llamacpp.add_args, llamacpp.run, "llama.cpp's greedy tokens from the fused GGUF against ours."),
    "distributed": (ranks.add_distributed_args, ranks.run_distributed,
                    "Two ranks of one core against one process of two."),
    "accumulation": (ranks.add_accumulation_args, ranks.run_accumulation,
                     "A batch in micro-batches: peak memory and speed."),
}
# What `python bench.py` with no section runs: the performance issue's whole table.
ALL = [["machine"], ["convert", "--size", "medium"], ["convert", "--size", "7b"],
       ["convert", "--size", "7b", "--layout", "hf"],
       ["train", "--size", "tiny", "--qlora"], ["train", "--size", "medium", "--qlora"], ["generate"]]


def build_parser():
    parser = argparse.ArgumentParser(description="Benchmarks for the mlx-lora scripts.")
    parser.add_argument("--results", default=os.path.join(ROOT, "bench_results.json"),
                        help="JSON file the results are merged into, one entry per section.")
    sub = parser.add_subparsers(dest="section",
                                help="What to measure (default: all of these in one run: "
                                + "; ".join(" ".join(a) for a in ALL) + ").")
    for name, (add_args, _, help_text) in SECTIONS.items():
        add_args(sub.add_parser(name, help=help_text))
    return parser


def run_section(args):
    results = stamp(SECTIONS[args.section][1](args))
    print_table(args.section, results)
    everything = read_json(args.results) if os.path.exists(args.results) else {}
    everything[results.pop("key", args.section)] = results
    write_json(args.results, everything)
    return results


def main():
    parser = build_parser()
    args = parser.parse_args()
    runs = [args] if args.section else [parser.parse_args(["--results", args.results] + a) for a in ALL]
    tic = time.perf_counter()
    for run in runs:
        run_section(run)
    print(f"\nwrote {args.results} ({time.perf_counter() - tic:.0f} s)")


if __name__ == "__main__":
    run_script(main)
