"""train: LoRA and QLoRA steps on random models, and the same step in PyTorch + PEFT."""

import itertools
import time

import blas

from benchmarks.fixtures import MODEL_SIZES, random_model
from benchmarks.peft_compare import peft_step


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


def run(args):
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


def add_args(p):
    p.add_argument("--size", default="medium", choices=list(MODEL_SIZES), help="Model shape (medium: about 150M).")
    p.add_argument("--batch-size", type=int, default=4, help="Sequences per step.")
    p.add_argument("--seq-len", type=int, default=256, help="Tokens per sequence.")
    p.add_argument("--targets", default="wq,wv", help="LoRA targets.")
    p.add_argument("--steps", type=int, default=5, help="Timed steps (median reported).")
    p.add_argument("--qlora", action="store_true", help="Also time QLoRA on a 4-bit base.")
