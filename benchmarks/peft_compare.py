"""peft: a converted GGUF model's LoRA and QLoRA steps over real data against PyTorch + PEFT (the
default model's over the shipped data unless told another)."""

import itertools
import os

import loading
from utils import UserError, read_json

from benchmarks.harness import add_main_job_args, time_steps
from formats.peft import hf_module
from models import NAMES


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


def peft_step(base, rank, alpha, targets, autocast, table=NAMES):
    """One training step of PyTorch + PEFT over `base` (a transformers model): a LoRA of this
    rank and alpha on `targets` (this toolkit's names, of the family of NameTable `table`), Adam,
    the cross-entropy of the targets the mask counts; with `autocast`, the forward pass under
    bfloat16 autocast. Every core."""
    import contextlib

    import torch
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(os.cpu_count() or 1)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                            target_modules=[hf_module(table, t) for t in targets]))
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


def peft_lora_seconds(gguf_path, batches, rank, alpha, targets, autocast=False, table=NAMES):
    """The same steps in PyTorch + PEFT over transformers' GGUF loader (float32)."""
    import torch
    import transformers

    folder, name = os.path.split(gguf_path)
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return time_steps(peft_step(base, rank, alpha, targets, autocast, table), batches)


def run(args):
    """LoRA and QLoRA on a model converted from a GGUF file (--model and --gguf; by default the
    default model, SmolLM2-135M-Instruct, over the shipped data), against PyTorch + PEFT LoRA on the
    same weights (transformers' GGUF loader dequantizes them), batches, rank, alpha and targets.
    PyTorch and PEFT serve this section alone (skipped without them)."""
    import importlib.util
    import tempfile

    if any(importlib.util.find_spec(name) is None for name in ("peft", "transformers")):
        return {"key": "peft", "skipped": "needs transformers and peft (test-only dependencies)"}

    import convert
    import models
    import ops

    gguf_path = args.gguf
    if not os.path.exists(gguf_path) or not os.path.isdir(args.model):
        raise UserError(f"{gguf_path}: run setup.sh first (it fetches and converts the default model; "
                        "--gemma3, Gemma 3 270M)")
    table = models.names_of(read_json(os.path.join(args.model, "config.json"), "model configuration"))
    targets = table.resolve_targets(models.parse_targets(args.targets))
    batches = real_batches(args.model, args.data, args.batches, args.batch_size, args.max_seq_length)
    n_tokens = sum(int(b[2].sum()) for b in batches)  # the tokens that carry loss
    results = {"key": "peft", "model": os.path.basename(gguf_path), "batches": f"{len(batches)} x {args.batch_size}",
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
    seconds["peft"] = peft_lora_seconds(gguf_path, batches, *lora, table=table)
    seconds["peft_bf16"] = peft_lora_seconds(gguf_path, batches, *lora, autocast=True, table=table)
    for kind, s in seconds.items():
        results[f"{kind}_loss_tokens_per_s"] = round(n_tokens / s, 1)
    for ours, theirs in itertools.product([k for k in seconds if not k.startswith("peft")], ["peft", "peft_bf16"]):
        results[f"{ours}_over_{theirs}"] = f"{seconds[theirs] / seconds[ours]:.2f}x"
    return results


def add_args(p):
    add_main_job_args(p)
    p.add_argument("--gguf", default=loading.DEFAULT_GGUF,
                   help="The GGUF file --model was converted from (PyTorch's copy; default: the default model's).")
    p.add_argument("--batches", type=int, default=12, help="Training batches timed (after one untimed pass).")
