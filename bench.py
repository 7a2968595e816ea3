"""Benchmarks, one subcommand per script measured; results print as a table and go to a JSON file.

    python bench.py                  machine, convert, train and generate in one run (ALL below;
                                     3-4 min on a 2-core Xeon)
    python bench.py machine          MLX's and numpy's float32 matmul, the BLAS's kernels, memory bandwidth
    python bench.py convert [--size 7b|medium] [--layout meta|hf] [--dir /tmp] [--dtype float16] [-q]
    python bench.py train [--size tiny|medium] [--qlora]    float32 and bfloat16 products, and PyTorch
    python bench.py generate [--size medium] [--kinds float32,float16,8-bit,4-bit] [--samples 16]
    python bench.py peft [--batches 12]     the default model's LoRA/QLoRA against PyTorch + PEFT
    python bench.py qa [--model FOLDER] [--adapter-file adapters/adapters.npz] [--samples 30]
    python bench.py fuse [--size 7b] [--formats mlx hf gguf] [-q]    fuse and export: time, peak memory
    python bench.py llamacpp         the main job's GGUF exports through llama.cpp (llama-cpp-python)
    python bench.py distributed      two ranks of one thread against one process of two
    python bench.py accumulation     one batch as one step and as micro-batches: memory, speed

MLX_LORA_CPU_KERNELS=0 in the environment measures plain MLX, without cpu_kernels/.

convert: writes a synthetic 7B-shaped bf16 checkpoint in Mistral's layout (dim
4096, 32 layers, hidden 14336, 32 heads, 8 KV heads, vocab 32000; about 14.5 GB),
runs convert.py on it in a subprocess while sampling the child's /proc status
every 50 ms, reports time and peak memory, then deletes everything. The memory
that matters is RssAnon: pages of the memory-mapped input are reclaimable page
cache, which VmHWM and ru_maxrss count but RssAnon does not.
"""

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import blas  # first: the fast BLAS before any section imports mlx.core
import loading
import utils
from utils import UserError, read_json, run_script, write_json

from models import NAMES
from formats.peft import hf_module

ROOT = os.path.dirname(os.path.abspath(__file__))

SIZES = {  # Mistral-flavour params.json values
    "7b": {"dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32,
           "n_kv_heads": 8, "norm_eps": 1e-5, "sliding_window": 4096, "vocab_size": 32000},
    "medium": {"dim": 1024, "n_layers": 8, "head_dim": 64, "hidden_dim": 2816, "n_heads": 16,
               "n_kv_heads": 4, "norm_eps": 1e-5, "vocab_size": 32000},
}
GiB = 2**30


def write_synthetic_checkpoint(folder, params):
    """Write consolidated.00.pth (bf16) without holding the model in anonymous memory.

    Every tensor is a fresh shared mapping of one scratch file of random values,
    so each is its own storage (torch.save writes them all) while its pages stay
    file-backed page cache. The values repeat between tensors; conversion cost
    does not depend on them.
    """
    import torch

    shapes = NAMES.shapes(params)
    biggest = max(math.prod(s) for s in shapes.values())
    scratch = os.path.join(folder, "scratch.bin")
    gen = torch.Generator().manual_seed(0)
    with open(scratch, "wb") as f:
        chunk = 1 << 24
        for start in range(0, biggest, chunk):
            n = min(chunk, biggest - start)
            f.write((0.02 * torch.randn(n, generator=gen)).bfloat16().view(torch.int16).numpy().tobytes())
    state = {}
    for key, shape in shapes.items():
        n = math.prod(shape)
        if len(shape) == 1:
            state[key] = (1.0 + 0.1 * torch.randn(n, generator=gen)).bfloat16()  # norms: small, real
        else:
            state[key] = torch.from_file(scratch, shared=True, size=n, dtype=torch.bfloat16).view(shape)
    torch.save(state, os.path.join(folder, "consolidated.00.pth"))
    del state
    os.remove(scratch)
    with open(os.path.join(folder, "params.json"), "w") as f:
        json.dump(params, f, indent=2)
    write_placeholder_tokenizer(folder)
    return sum(math.prod(s) for s in shapes.values())


def write_placeholder_tokenizer(folder):
    """convert.py only copies a checkpoint's tokenizer.model, and the benchmark never tokenizes: a
    placeholder keeps the benchmark free of files outside this repository."""
    with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
        f.write(b"placeholder: the benchmark never tokenizes")


def write_synthetic_hf_checkpoint(folder, params, shard_bytes=5 * 10**9):
    """Write a Hugging Face folder (config.json, bf16 safetensors shards and their index) of the
    same shapes, streaming one buffer of random bf16 values into every tensor."""
    import numpy as np

    from formats.hf import shard_plan

    shapes = {NAMES.rename(key, "ours", "hf"): shape for key, shape in NAMES.shapes(params).items()}
    pattern = (0.02 * np.random.default_rng(0).standard_normal(1 << 23)).astype(np.float32)
    pattern = (pattern.view(np.uint32) >> 16).astype(np.uint16).tobytes()  # bfloat16 bits: 16 MiB
    weight_map = {}
    for shard, names in shard_plan({name: 2 * math.prod(shape) for name, shape in shapes.items()},
                                   shard_bytes).items():
        header, offset = {}, 0
        for name in names:
            nbytes = 2 * math.prod(shapes[name])
            header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = shard
        blob = json.dumps(header).encode()
        with open(os.path.join(folder, shard), "wb") as f:
            f.write(len(blob).to_bytes(8, "little") + blob)
            for name in names:
                left = 2 * math.prod(shapes[name])
                while left:
                    f.write(pattern[:min(left, len(pattern))])
                    left -= min(left, len(pattern))
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": weight_map}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": "mistral", "hidden_size": params["dim"], "num_hidden_layers": params["n_layers"],
                   "num_attention_heads": params["n_heads"], "num_key_value_heads": params["n_kv_heads"],
                   "head_dim": params["head_dim"], "intermediate_size": params["hidden_dim"],
                   "rms_norm_eps": params["norm_eps"], "vocab_size": params["vocab_size"],
                   "sliding_window": params.get("sliding_window"), "rope_theta": 10000.0}, f, indent=2)
    write_placeholder_tokenizer(folder)
    return sum(math.prod(s) for s in shapes.values())


def read_status(pid):
    """Memory fields of /proc/<pid>/status in bytes (empty once the process is gone)."""
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in ("RssAnon", "RssFile", "VmHWM", "VmRSS"):
                    fields[name] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return fields


def run_sampled(cmd, interval=0.05, stderr=None):
    """Run `cmd`, sampling its memory every `interval` s; return (exit code, seconds, peaks, rusage)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=stderr)
    peaks = {"RssAnon": 0, "RssFile": 0, "VmHWM": 0}
    while True:
        status = read_status(proc.pid)
        for k in peaks:
            peaks[k] = max(peaks[k], status.get(k, 0))
        pid, wait_status, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(interval)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(wait_status)
    return proc.returncode, seconds, peaks, rusage


def disk_bytes(path):
    """Bytes of a file, or of the files in a folder."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))


def bench_convert(args):
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


def add_convert_args(p):
    p.add_argument("--size", default="7b", choices=list(SIZES), help="Checkpoint shape: 7b (14.5 GB) or medium (0.3 GB).")
    p.add_argument("--layout", default="meta", choices=["meta", "hf"],
                   help="Meta's consolidated.00.pth, or a Hugging Face folder of safetensors shards.")
    p.add_argument("--dir", default=None, help="Where to write the temporary checkpoint and output (default: the temp dir).")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"], help="convert.py --dtype.")
    p.add_argument("--format", default="npz", choices=["npz", "safetensors"], help="convert.py --format.")
    p.add_argument("-q", "--quantize", action="store_true", help="Pass -q to convert.py.")
    p.add_argument("--q-bits", type=int, default=4, help="convert.py --q-bits.")
    p.add_argument("--q-group-size", type=int, default=64, help="convert.py --q-group-size.")


# ----------------------------------------------------------------------------- train

MODEL_SIZES = {  # ModelArgs of random models for the training benchmark
    "tiny": dict(dim=320, n_layers=6, n_heads=8, n_kv_heads=4, head_dim=40, hidden_dim=864, vocab_size=4096),
    "medium": dict(dim=1024, n_layers=8, n_heads=16, n_kv_heads=4, head_dim=64, hidden_dim=2816, vocab_size=32000),
}


def matmul_parameters(model):
    """Weights used in matmuls per token: every linear layer and the output, not the embedding."""
    import mlx.nn as nn

    total = 0
    for _, module in model.named_modules():
        if isinstance(module, nn.QuantizedLinear):
            total += module.weight.shape[0] * module.weight.shape[1] * 32 // module.bits
        elif isinstance(module, nn.Linear):
            total += module.weight.size
    return total


def bench_train(args):
    """LoRA (and QLoRA) steps on random models: tokens/s and useful GFLOP/s, the products in
    float32 and, where the CPU has AMX, in bfloat16 (--compute-dtype bfloat16)."""
    import mlx.core as mx
    import mlx.optimizers as optim

    import models
    import ops
    import trainer

    results = {"key": f"train-{args.size}", "size": args.size, "batch": f"{args.batch_size} x {args.seq_len}",
               "targets": args.targets}
    precisions = ["float32"] + (["bfloat16"] if ops.bfloat16_products_available() else [])
    for bits, precision in itertools.product([None] + ([4] if args.qlora else []), precisions):
        kind = ("qlora4" if bits else "lora") + ("_bf16" if precision == "bfloat16" else "")
        model = random_model(args.size, bits=bits, compute_dtype=precision)
        mx.reset_peak_memory()
        flops_params = matmul_parameters(model)
        models.apply_lora(model, models.AdapterConfig(layers=len(model.layers),
                                                      targets=models.parse_targets(args.targets)))
        optimizer = optim.Adam(learning_rate=1e-5)
        step = trainer.make_train_step(model, optimizer)
        tokens = mx.random.randint(0, model.args.vocab_size, (args.batch_size, args.seq_len + 1))
        batch = (tokens[:, :-1], tokens[:, 1:], mx.ones((args.batch_size, args.seq_len)))
        times = []
        for i in range(args.steps + 2):  # two warm-up steps: compilation, allocation
            tic = time.perf_counter()
            mx.eval(step(*batch), model.trainable_parameters(), optimizer.state)
            if i >= 2:
                times.append(time.perf_counter() - tic)
        seconds = sorted(times)[len(times) // 2]
        n_tokens = args.batch_size * args.seq_len
        results[f"{kind}_tokens_per_s"] = round(n_tokens / seconds, 1)
        # Useful work: forward 2 and backward through activations 2 FLOPs per weight and token.
        results[f"{kind}_useful_GFLOPs"] = round(4 * flops_params * n_tokens / seconds / 1e9, 1)
        results[f"{kind}_step_s"] = round(seconds, 3)
        results[f"{kind}_peak_memory_GB"] = round(trainer.peak_memory_gb(), 2)
    results["matmul_params_M"] = round(flops_params / 1e6, 1)
    results["blas"] = blas.describe()
    results.update(pytorch_reference(args, {k[:-len("_tokens_per_s")]: v for k, v in results.items()
                                            if k.startswith("lora") and k.endswith("_tokens_per_s")}))
    return results


def pytorch_reference(args, mlx_tokens_per_s):
    """The same LoRA step in PyTorch + PEFT, same shape, batch, rank and targets: float32, and
    under bfloat16 autocast (oneDNN's bf16 units where the CPU has them); each of this
    toolkit's LoRA kinds in `mlx_tokens_per_s` ({kind: tokens/s}) as a ratio to both. Skipped
    without torch, transformers and peft (test-only dependencies)."""
    import importlib.util

    if any(importlib.util.find_spec(name) is None for name in ("torch", "transformers", "peft")):
        return {"pytorch": "skipped: needs torch, transformers and peft"}
    results = {}
    for precision in ("float32", "bfloat16"):
        seconds = torch_lora_step_seconds(args, autocast=precision == "bfloat16")
        tokens_per_s = args.batch_size * args.seq_len / seconds
        results[f"pytorch_{precision}_tokens_per_s"] = round(tokens_per_s, 1)
        for kind, ours in mlx_tokens_per_s.items():
            results[f"{kind}_over_pytorch_{precision}"] = f"{ours / tokens_per_s:.2f}x"
    return results


def torch_lora_step_seconds(args, autocast):
    """Median seconds of a LoRA step of MODEL_SIZES[args.size] as transformers' LlamaForCausalLM
    with PEFT's LoRA (rank 8, alpha 16, like apply_lora's defaults), every core."""
    import numpy as np
    import torch
    import transformers

    torch.manual_seed(0)
    shape = MODEL_SIZES[args.size]
    config = transformers.LlamaConfig(
        hidden_size=shape["dim"], num_hidden_layers=shape["n_layers"], num_attention_heads=shape["n_heads"],
        num_key_value_heads=shape["n_kv_heads"], head_dim=shape["head_dim"], intermediate_size=shape["hidden_dim"],
        vocab_size=shape["vocab_size"], rms_norm_eps=1e-5, tie_word_embeddings=False)
    step = peft_step(transformers.LlamaForCausalLM(config), 8, 16, args.targets.split(","), autocast)
    tokens = np.random.default_rng(0).integers(0, shape["vocab_size"], (args.batch_size, args.seq_len + 1))
    batch = (tokens[:, :-1], tokens[:, 1:], np.ones((args.batch_size, args.seq_len), np.float32))
    times = []
    for i in range(args.steps + 2):  # two warm-up steps, as for MLX
        tic = time.perf_counter()
        step(batch)
        if i >= 2:
            times.append(time.perf_counter() - tic)
    return sorted(times)[len(times) // 2]


def add_train_args(p):
    p.add_argument("--size", default="medium", choices=list(MODEL_SIZES), help="Model shape (medium: about 150M).")
    p.add_argument("--batch-size", type=int, default=4, help="Sequences per step.")
    p.add_argument("--seq-len", type=int, default=256, help="Tokens per sequence.")
    p.add_argument("--targets", default="wq,wv", help="LoRA targets.")
    p.add_argument("--steps", type=int, default=5, help="Timed steps (median reported).")
    p.add_argument("--qlora", action="store_true", help="Also time QLoRA on a 4-bit base.")


# ----------------------------------------------------------------------------- the real model against PEFT


def real_batches(model_dir, data, n_batches, batch_size, max_seq_length):
    """n_batches of the shipped data's training batches through the model's chat template:
    (inputs, targets, mask) as numpy arrays, the same for every trainer timed."""
    import numpy as np

    import chat
    import dataset
    from loading import tokenizer_settings
    from tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir, tokenizer_settings(read_json(os.path.join(model_dir, "config.json"))))
    split = dataset.load_split(data, "train", tokenizer, max_seq_length, False, chat.load_template(model_dir))
    plan = dataset.batch_plan(split, batch_size)
    order = np.random.default_rng(0).permutation(len(plan))[:n_batches]
    return [tuple(np.array(a) for a in dataset.make_batch(split, plan[i])) for i in order]


def time_steps(step, batches):
    """Seconds of one pass over `batches`, after a first pass that compiles every shape."""
    for batch in batches:
        step(batch)
    tic = time.perf_counter()
    for batch in batches:
        step(batch)
    return time.perf_counter() - tic


def mlx_lora_seconds(model_dir, batches, rank, alpha, targets, compute_dtype="auto"):
    import mlx.core as mx
    import mlx.optimizers as optim

    import models
    import trainer
    from loading import load_model

    model, _, _ = load_model(model_dir, compute_dtype=compute_dtype)
    models.apply_lora(model, models.AdapterConfig(layers=len(model.layers), targets=targets, rank=rank, alpha=alpha))
    optimizer = optim.Adam(learning_rate=1e-5)
    compiled = trainer.make_train_step(model, optimizer)

    def step(batch):
        mx.eval(compiled(*map(mx.array, batch)), model.trainable_parameters(), optimizer.state)

    return time_steps(step, batches)


def peft_step(base, rank, alpha, targets, autocast):
    """One training step of PyTorch + PEFT over `base` (a transformers model): a LoRA of this
    rank and alpha on `targets` (this toolkit's names), Adam, the cross-entropy of the targets
    the mask counts; with `autocast`, the forward pass under bfloat16 autocast. Every core."""
    import contextlib

    import torch
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(os.cpu_count() or 1)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                            target_modules=[hf_module(t) for t in targets]))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    precision = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()

    def step(batch):
        inputs, targets_, mask = (torch.from_numpy(a) for a in batch)
        with precision:
            logits = model(input_ids=inputs.long()).logits.float()
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets_.long().flatten(), reduction="none")
        loss = (ce * mask.flatten()).sum() / mask.sum().clamp(min=1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def peft_lora_seconds(gguf_path, batches, rank, alpha, targets, autocast=False):
    """The same steps in PyTorch + PEFT over transformers' GGUF loader (float32)."""
    import torch
    import transformers

    folder, name = os.path.split(gguf_path)
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return time_steps(peft_step(base, rank, alpha, targets, autocast), batches)


def bench_peft(args):
    """LoRA and QLoRA on the default model (SmolLM2-135M-Instruct) over the shipped data, against
    PyTorch + PEFT LoRA on the same weights, batches, rank, alpha and targets. PyTorch and PEFT
    serve this section alone (skipped without them)."""
    import importlib.util
    import tempfile

    if any(importlib.util.find_spec(name) is None for name in ("peft", "transformers")):
        return {"key": "peft", "skipped": "needs transformers and peft (test-only dependencies)"}

    import convert
    import models
    import ops

    gguf_path = loading.DEFAULT_GGUF
    if not os.path.exists(gguf_path) or not os.path.isdir(args.model):
        raise UserError(f"{gguf_path}: run setup.sh first (it fetches and converts the default model)")
    targets = models.parse_targets(args.targets)
    batches = real_batches(args.model, args.data, args.batches, args.batch_size, args.max_seq_length)
    n_tokens = sum(int(b[2].sum()) for b in batches)  # the tokens that carry loss
    results = {"key": "peft", "model": "SmolLM2-135M-Instruct", "batches": f"{len(batches)} x {args.batch_size}",
               "max_seq_length": args.max_seq_length, "rank": args.rank, "targets": args.targets,
               "loss_tokens": n_tokens}
    lora = (args.rank, 2 * args.rank, targets)
    bfloat16 = ops.bfloat16_products_available()
    with tempfile.TemporaryDirectory() as tmp:
        convert.convert(gguf_path, os.path.join(tmp, "f32"), dtype="float32")  # LoRA's float copy
        seconds = {"lora": mlx_lora_seconds(os.path.join(tmp, "f32"), batches, *lora),
                   "qlora": mlx_lora_seconds(args.model, batches, *lora)}
        if bfloat16:
            seconds["qlora_bf16"] = mlx_lora_seconds(args.model, batches, *lora, compute_dtype="bfloat16")
    seconds["peft"] = peft_lora_seconds(gguf_path, batches, *lora)
    seconds["peft_bf16"] = peft_lora_seconds(gguf_path, batches, *lora, autocast=True)
    for kind, s in seconds.items():
        results[f"{kind}_loss_tokens_per_s"] = round(n_tokens / s, 1)
    for ours, theirs in itertools.product([k for k in seconds if not k.startswith("peft")], ["peft", "peft_bf16"]):
        results[f"{ours}_over_{theirs}"] = f"{seconds[theirs] / seconds[ours]:.2f}x"
    return results


def add_main_job_args(p):
    """The main job's training settings, shared by the sections that train the default model."""
    p.add_argument("--model", default=loading.DEFAULT_MODEL, help="The default model's folder (4-bit, for QLoRA).")
    p.add_argument("--data", default=os.path.join(ROOT, "data"), help="Folder with the chat train.jsonl.")
    p.add_argument("--batch-size", type=int, default=4, help="Conversations per batch (over all ranks).")
    p.add_argument("--max-seq-length", type=int, default=128, help="Tokens per conversation at most.")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank.")
    p.add_argument("--targets", default="all", help="LoRA targets.")


def add_peft_args(p):
    add_main_job_args(p)
    p.add_argument("--batches", type=int, default=12, help="Training batches timed (after one untimed pass).")


# ----------------------------------------------------------------------------- distributed

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


def run_on_ranks(n_ranks, command):
    """`command` on `n_ranks` ranks of a ring over loopback, rank r pinned to core r (one thread
    each): the environment mlx.launch sets (MLX_RANK, MLX_HOSTFILE), without mlx.launch, whose
    0.32 loop polls its children's pipes without pause and takes a core of its own.
    Returns (exit codes, rank 0's stdout, rank 0's stderr)."""
    import socket

    if n_ranks == 1:
        run = subprocess.run(command, capture_output=True, text=True)
        return [run.returncode], run.stdout, run.stderr
    with tempfile.TemporaryDirectory() as tmp:
        hostfile = os.path.join(tmp, "hosts.json")
        sockets = [socket.create_server(("127.0.0.1", 0)) for _ in range(n_ranks)]
        write_json(hostfile, [[f"127.0.0.1:{s.getsockname()[1]}"] for s in sockets])
        for s in sockets:
            s.close()
        procs = [subprocess.Popen(["taskset", "-c", str(rank % os.cpu_count()), *command], text=True,
                                  env=dict(os.environ, MLX_RANK=str(rank), MLX_HOSTFILE=hostfile),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for rank in range(n_ranks)]
        outputs = [p.communicate() for p in procs]
    return [p.returncode for p in procs], *outputs[0]


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


def bench_distributed(args):
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


def bench_accumulation(args):
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


# ----------------------------------------------------------------------------- machine

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


def best_time(fn, repeats=5):
    fn()  # warm-up: page faults, thread start
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return min(times)


def bench_machine(args):
    """This machine's own ceilings: float32 matmul through MLX's BLAS (which library, which
    kernels) and numpy's own, memory bandwidth."""
    mlx_matmul, numpy_matmul = blas.matmul_GFLOPs()
    copy, read = memory_probes()
    return {"key": "machine", "blas": blas.describe(), "mlx_matmul_GFLOPs": round(mlx_matmul, 1),
            "numpy_matmul_GFLOPs": round(numpy_matmul, 1),
            "copy_bandwidth_GBs": round(best_GBs(copy), 1), "read_bandwidth_GBs": round(best_GBs(read), 1)}


# ----------------------------------------------------------------------------- generate

WEIGHT_KINDS = {"float32": ("float32", None), "float16": ("float16", None), "8-bit": ("float32", 8),
                "4-bit": ("float32", 4)}


def random_model(size, bits=None, dtype="float32", generation_only=False, compute_dtype="auto"):
    """A random model of MODEL_SIZES[size], optionally quantized as convert.py -q does
    (the layers whose input width divides into groups of 64), its floats stored in
    `dtype` and then cast as load_model does (on the CPU: float32 computation)."""
    import mlx.core as mx
    import mlx.nn as nn

    import loading
    import models

    mx.random.seed(0)
    model = models.Model(models.ModelArgs(norm_eps=1e-5, **MODEL_SIZES[size]))
    if bits:
        nn.quantize(model, 64, bits, class_predicate=lambda _, m: hasattr(m, "to_quantized")
                    and m.weight.shape[-1] % 64 == 0)
    loading.cast_floats(model, getattr(mx, dtype))
    loading.set_compute_dtype(model, compute_dtype, generation_only)
    mx.eval(model.parameters())
    return model


def weight_bytes_per_token(model):
    """Bytes of weights one decoded token reads: every layer but the embedding table,
    of which it reads one row."""
    from mlx.utils import tree_flatten

    return sum(v.nbytes for k, v in tree_flatten(model.parameters()) if not k.startswith("tok_embeddings"))


def decode_beside_bandwidth(tokens, n_tokens, samples):
    """Decode n_tokens in `samples` parts, each after one timed copy and one read of
    memory_probes, so that the bound and the decoding see the same moments of this
    machine, whose bandwidth drifts by 10-30 % within seconds. Returns the decode
    tokens/s and the mean copy and read bandwidth (GB/s) over those moments."""
    import mlx.core as mx

    probes = memory_probes()
    probe_bytes, probe_s, decode_s = [0, 0], [0.0, 0.0], 0.0
    for part in range(samples):
        for i, probe in enumerate(probes):
            tic = time.perf_counter()
            probe_bytes[i] += probe()
            probe_s[i] += time.perf_counter() - tic
        tic = time.perf_counter()
        for _ in range(n_tokens * (part + 1) // samples - n_tokens * part // samples):
            next(tokens)
        mx.synchronize()  # the step queued behind the last token is this part's, not the copy's
        decode_s += time.perf_counter() - tic
    copy_bw, read_bw = (n / seconds / 1e9 for n, seconds in zip(probe_bytes, probe_s))
    return n_tokens / decode_s, copy_bw, read_bw


def bench_generate(args):
    """Prompt and decode tokens/s per weight kind, beside the memory-bandwidth bound."""
    import ops

    if min(args.decode_tokens, args.samples, args.prompt_len) < 1:
        raise UserError("--decode-tokens, --samples and --prompt-len must be at least 1")
    results = {"key": f"generate-{args.size}", "size": args.size, "prompt_tokens": args.prompt_len,
               "cpu_kernels": ops.kernels is not None}
    for kind in args.kinds.split(","):
        results.update({f"{kind}_{key}": value for key, value in generation_speeds(kind, args).items()})
    return results


def generation_speeds(kind, args):
    """Prompt and decode speeds of a random model of one weight kind, and the bandwidth bound."""
    import mlx.core as mx

    import generate

    dtype, bits = WEIGHT_KINDS[kind]
    model = random_model(args.size, bits, dtype, generation_only=True)  # as lora.py --prompt
    prompt = mx.random.randint(0, model.args.vocab_size, (args.prompt_len,)).tolist()
    prompt_s = best_time(lambda: mx.eval(model(mx.array([prompt]), model.make_cache())), repeats=2)
    tokens = generate.generate_tokens(model, prompt)
    next(tokens)  # the first token comes with the prompt
    weight_bytes = weight_bytes_per_token(model)
    decode_tps, copy_bw, read_bw = decode_beside_bandwidth(tokens, args.decode_tokens, args.samples)
    bound_tps, read_bound_tps = copy_bw * 1e9 / weight_bytes, read_bw * 1e9 / weight_bytes
    return {"prompt_tokens_per_s": round(args.prompt_len / prompt_s, 1),
            "decode_tokens_per_s": round(decode_tps, 1), "copy_bandwidth_GBs": round(copy_bw, 1),
            "read_bandwidth_GBs": round(read_bw, 1), "bandwidth_bound_tokens_per_s": round(bound_tps, 1),
            "decode_of_bound": f"{decode_tps / bound_tps:.0%}", "decode_of_read_bound": f"{decode_tps / read_bound_tps:.0%}"}


def add_generate_args(p):
    p.add_argument("--size", default="medium", choices=list(MODEL_SIZES), help="Model shape (medium: about 150M).")
    p.add_argument("--kinds", default=",".join(WEIGHT_KINDS), help="Weight kinds, comma-separated.")
    p.add_argument("--prompt-len", type=int, default=128, help="Prompt tokens.")
    p.add_argument("--decode-tokens", type=int, default=64, help="Decoded tokens timed.")
    p.add_argument("--samples", type=int, default=16,
                   help="Parts the decoding is timed in, each after a timed copy and read of 512 MiB.")


# ----------------------------------------------------------------------------- qa

def answer_metrics(generated, reference):
    """Does the answer name the right object, match its first line, match it whole?"""
    name = reference.split("(")[0].split(" ")[0]
    return {"name": generated.startswith(name),
            "first_line": generated.split("\n")[0] == reference.split("\n")[0],
            "exact": generated.strip() == reference.strip()}


def qa_pairs(path, n):
    """(question, reference answer) of the first `n` conversations of a chat split."""
    from utils import read_jsonl

    pairs = []
    for _, obj in read_jsonl(path):
        turns = {m["role"]: m["content"] for m in obj["messages"]}
        pairs.append((turns["user"], turns["assistant"]))
    return pairs[:n]


def ask(model, tokenizer, template, question, limit):
    """The greedy reply to one user turn through the chat template, at most `limit` tokens."""
    import chat
    import generate

    prompt = tokenizer.encode(chat.render(template, [{"role": "user", "content": question}], tokenizer), bos=False)
    return "".join(generate.stream_text(model, tokenizer, prompt, limit))


def score(model_dir, adapter_file, data, samples):
    """{split: ({metric: right answers}, [(question, answer)])} of one model (with adapters)."""
    import chat
    from loading import load_model

    model, tokenizer, _ = load_model(model_dir, adapter_file=adapter_file, generation_only=True)
    template = chat.load_template(model_dir)
    if template is None:
        raise UserError(f"{model_dir}: qa asks through the chat template, and this model has none")
    out = {}
    for split in ("train", "test"):
        scores, answers = {"name": 0, "first_line": 0, "exact": 0}, []
        for question, reference in qa_pairs(os.path.join(data, f"{split}.jsonl"), samples):
            answer = ask(model, tokenizer, template, question, len(tokenizer.encode(reference, bos=False)) + 8)
            answers.append((question, answer))
            for metric, ok in answer_metrics(answer.strip(), reference).items():
                scores[metric] += ok
        out[split] = (scores, answers)
    return out


def bench_qa(args):
    """Greedy answers to the dataset's questions through the chat template, scored against its
    answers: the base model, and with --adapter-file the adapted one (before and after)."""
    results = {"key": "qa", "model": args.model, "adapter_file": args.adapter_file, "samples": args.samples}
    runs = [("before", None)] + ([("after", args.adapter_file)] if args.adapter_file else [])
    for when, adapter_file in runs:
        for split, (scores, answers) in score(args.model, adapter_file, args.data, args.samples).items():
            for metric, n in scores.items():
                results[f"{split}_{metric}_{when}"] = f"{n}/{len(answers)}"
            results[f"{split}_answers_{when}"] = [f"{q} -> {a[:120]!r}" for q, a in answers[:args.show]]
    return results


def add_qa_args(p):
    p.add_argument("--model", default=loading.DEFAULT_MODEL, help="Model folder (default: the default model).")
    p.add_argument("--adapter-file", default=None, help="Adapters to score beside the base model.")
    p.add_argument("--data", default=os.path.join(ROOT, "data"), help="Folder with chat train.jsonl and test.jsonl.")
    p.add_argument("--samples", type=int, default=30, help="Questions per split (the first N).")
    p.add_argument("--show", type=int, default=4, help="Answers per split to print.")


# ----------------------------------------------------------------------------- fuse

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


def write_random_adapters(adapter_file, params, rank=8, targets=("wq", "wv")):
    """LoRA adapters of every layer with non-zero B, in lora.py's layout, for a synthetic model."""
    import numpy as np

    shapes = NAMES.shapes(params)
    rng = np.random.default_rng(0)
    arrays = {}
    for i in range(params["n_layers"]):
        for target in targets:
            out_dims, in_dims = shapes[f"layers.{i}.attention.{target}.weight"]
            arrays[f"layers.{i}.attention.{target}.lora_a"] = (rng.standard_normal((in_dims, rank)) / in_dims ** 0.5)
            arrays[f"layers.{i}.attention.{target}.lora_b"] = 0.02 * rng.standard_normal((rank, out_dims))
    np.savez(adapter_file, **{k: v.astype(np.float32) for k, v in arrays.items()})
    write_json(os.path.splitext(adapter_file)[0] + ".json",
               {"lora_layers": params["n_layers"], "targets": list(targets), "rank": rank, "alpha": 2.0 * rank})


def bench_fuse(args):
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


def add_fuse_args(p):
    p.add_argument("--size", default="7b", choices=list(SIZES), help="Model shape: 7b or medium.")
    p.add_argument("--dir", default=None, help="Where to write the temporary models (default: the temp dir).")
    p.add_argument("-q", "--quantize", action="store_true", help="A 4-bit base (QLoRA), re-quantized when fused.")
    p.add_argument("--formats", nargs="+", default=["mlx", "hf", "gguf"], choices=["mlx", "hf", "gguf"],
                   help="fuse.py --format values to run.")


# ----------------------------------------------------------------------------- llama.cpp

def bench_llamacpp(args):
    """The default model with the main job's adapters, fused to GGUF (re-quantized, and float32),
    run by llama.cpp itself (llama-cpp-python, optional): does it read the same prompt tokens,
    and choose the same greedy tokens as this toolkit, both over the same GGUF file (read back by
    convert.py) and as the adapted model (base + adapters) the export stands for?"""
    try:
        import llama_cpp
    except ImportError:
        raise UserError("llamacpp needs llama-cpp-python (pip install llama-cpp-python; it compiles llama.cpp)")
    import chat

    template = chat.load_template(args.model)
    questions = [q for q, _ in qa_pairs(os.path.join(args.data, "test.jsonl"), args.samples)]
    adapted = greedy_replies(args.model, args.adapter_file, template, questions, args.tokens)
    results = {"key": "llamacpp", "model": args.model, "adapter_file": args.adapter_file, "prompts": len(questions)}
    with tempfile.TemporaryDirectory() as work:
        for name, extra in (("requantized", []), ("float32", ["--dtype", "float32"])):
            path, folder = os.path.join(work, f"{name}.gguf"), os.path.join(work, name)
            run_fuse(args.model, args.adapter_file, path, "gguf", extra)
            if run_sampled([sys.executable, os.path.join(ROOT, "convert.py"), "--hf-path", path,
                            "--mlx-path", folder])[0] != 0:
                raise UserError(f"convert.py could not read {path} back")
            same_file = greedy_replies(folder, None, template, questions, args.tokens)
            llm = llama_cpp.Llama(path, n_ctx=1024, n_threads=os.cpu_count(), verbose=False)
            counts = {"same_prompt_tokens": 0, "same_greedy_as_this_file_here": 0, "same_greedy_as_adapted": 0}
            for (tokens, text, ours), (_, _, reference) in zip(same_file, adapted):
                counts["same_prompt_tokens"] += llm.tokenize(text.encode(), add_bos=False, special=True) == tokens
                theirs = first_tokens(llm.generate(tokens, top_k=1, temp=0.0, reset=True), {llm.token_eos()}, args.tokens)
                counts["same_greedy_as_this_file_here"] += theirs == ours
                counts["same_greedy_as_adapted"] += theirs == reference
            results.update({f"{name}_{k}": f"{n}/{len(questions)}" for k, n in counts.items()})
            del llm
    return results


def greedy_replies(model_dir, adapter_file, template, questions, limit):
    """[(prompt tokens, prompt text, first greedy tokens)] of each question as one chat turn,
    computed in float32."""
    import chat
    import generate
    from loading import load_model

    model, tokenizer, _ = load_model(model_dir, adapter_file=adapter_file, compute_dtype="float32")
    out = []
    for question in questions:
        text = chat.render(template, [{"role": "user", "content": question}], tokenizer)
        tokens = tokenizer.encode(text, bos=False)
        out.append((tokens, text, first_tokens(generate.generate_tokens(model, tokens), tokenizer.eos_ids, limit)))
    return out


def first_tokens(tokens, eos_ids, limit):
    """The first `limit` tokens of a generator, up to its end of sequence."""
    out = []
    for token in tokens:
        if token in eos_ids or len(out) == limit:
            break
        out.append(token)
    return out


def add_llamacpp_args(p):
    p.add_argument("--model", default=loading.DEFAULT_MODEL, help="Base model folder (default: the default model).")
    p.add_argument("--adapter-file", default=os.path.join(ROOT, "adapters", "adapters.npz"),
                   help="Adapters to fuse (default: the main job's).")
    p.add_argument("--data", default=os.path.join(ROOT, "data"), help="Folder with chat test.jsonl.")
    p.add_argument("--samples", type=int, default=10, help="Test questions to ask.")
    p.add_argument("--tokens", type=int, default=32, help="Greedy tokens to compare per question.")


SECTIONS = {
    "machine": (lambda p: None, bench_machine, "numpy matmul GFLOP/s, memory copy and read bandwidth."),
    "convert": (add_convert_args, bench_convert, "Convert a synthetic checkpoint; peak memory and time."),
    "train": (add_train_args, bench_train, "LoRA / QLoRA training speed on a random model."),
    "generate": (add_generate_args, bench_generate, "Prompt and decode tokens/s for float32/16, 8- and 4-bit."),
    "peft": (add_peft_args, bench_peft, "The default model's LoRA and QLoRA steps against PyTorch + PEFT."),
    "qa": (add_qa_args, bench_qa, "Greedy chat answers to dataset questions, before and after fine-tuning."),
    "fuse": (add_fuse_args, bench_fuse, "Fuse and export a synthetic 7B-shaped model; peak memory and time."),
    "llamacpp": (add_llamacpp_args, bench_llamacpp, "llama.cpp's greedy tokens from the fused GGUF against ours."),
    "distributed": (add_distributed_args, bench_distributed, "Two ranks of one core against one process of two."),
    "accumulation": (add_accumulation_args, bench_accumulation, "A batch in micro-batches: peak memory and speed."),
}
# What `python bench.py` with no section runs: the performance issue's whole table.
ALL = [["machine"], ["convert", "--size", "medium"], ["convert", "--size", "7b"],
       ["convert", "--size", "7b", "--layout", "hf"],
       ["train", "--size", "tiny", "--qlora"], ["train", "--size", "medium", "--qlora"], ["generate"]]


def build_parser():
    parser = argparse.ArgumentParser(description="Benchmarks for the mlx-lora scripts.")
    parser.add_argument("--results", default=os.path.join(ROOT, "bench_results.json"),
                        help="JSON file the results are merged into, one entry per section.")
    sub = parser.add_subparsers(dest="section", help="What to measure (default: machine, convert, train and generate).")
    for name, (add_args, _, help_text) in SECTIONS.items():
        add_args(sub.add_parser(name, help=help_text))
    return parser


def print_table(title, results):
    width = max(len(k) for k in results)
    print(f"\n{title}")
    for key, value in results.items():
        print(f"  {key:<{width}}  {value}")


def commit():
    """The commit measured, with "+changes" when the work tree differs from it."""
    def git(*words):
        return subprocess.run(["git", *words], cwd=os.path.dirname(os.path.abspath(__file__)),
                              capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "--short=10", "HEAD")
    return f"{head}+changes" if head and git("status", "--porcelain", "--untracked-files=no") else head or None


def run_section(args):
    results = SECTIONS[args.section][1](args)
    results["when"] = datetime.datetime.now().isoformat(timespec="seconds")
    results["commit"] = commit()
    results["cpu"] = blas.cpu_name()
    results["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}"
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
