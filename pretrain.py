"""Pretrain a LLaMA-architecture model from scratch on a plain-text corpus.

    python pretrain.py --corpus corpus/ --out base_model --dim 256 --n-layers 6 ...

The corpus folder holds train.jsonl and valid.jsonl, one {"text": document} per
line (cwk_create_dataset.py --format plain writes them). A SentencePiece BPE
tokenizer with byte fallback is trained on the training split unless one is
given. Documents are joined as BOS doc EOS BOS doc EOS ... and cut into blocks of
context + 1 tokens (inputs and targets shifted by one); the last block is padded
and its padding masked out of the loss. The output folder has convert.py's layout
(config.json, weights.npz, tokenizer.model), so lora.py fine-tunes it directly.
"""

import contextlib
import dataclasses
import io
import math
import os
import shutil
import sys
from dataclasses import dataclass
from typing import Optional

import utils  # noqa: F401  (fast BLAS before mlx.core)
from utils import UserError, read_jsonl

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map_with_path

import distributed
import models
import settings
import trainer
from settings import option, redefault
from tokenizer import SentencePieceTokenizer

DESCRIPTION = "Pretrain a LLaMA-architecture model from scratch."


@dataclass
class PretrainSettings(trainer.TrainingSettings):
    corpus: str = option(None, "folder with train.jsonl and valid.jsonl of {\"text\": ...}", required=True)
    out: str = option(None, "output model folder (config.json, weights.npz, tokenizer.model)", required=True)
    tokenizer: Optional[str] = option(None, "an existing tokenizer.model; default: train one on the corpus")
    vocab_size: int = option(4096, "pieces of the trained tokenizer", at_least=260, at_most=2**20)
    dim: int = option(256, "model dimension", at_least=1)
    n_layers: int = option(6, "transformer blocks", at_least=1)
    n_heads: int = option(8, "query heads", at_least=1)
    n_kv_heads: int = option(4, "key/value heads (grouped-query attention)", at_least=1)
    hidden_dim: int = option(704, "feed-forward hidden dimension", at_least=1)
    context: int = option(256, "tokens per training block", at_least=1)
    rope_theta: float = option(10000.0, "RoPE base", above=0)
    min_learning_rate: float = option(1e-4, "learning rate at the end of the cosine", at_least=0)
    weight_decay: float = option(0.1, "AdamW weight decay (matrices only)", at_least=0)
    grad_clip: float = option(1.0, "clip the global gradient norm to this", above=0)
    dtype: str = option("float16", "dtype of the saved weights (training is float32)",
                        choices=["float16", "bfloat16", "float32"])
    # The training loop's settings, with this script's defaults
    batch_size: int = redefault(trainer.TrainingSettings, "batch_size", 16)
    iters: int = redefault(trainer.TrainingSettings, "iters", 2000)
    learning_rate: float = redefault(trainer.TrainingSettings, "learning_rate", 1e-3)
    warmup: int = redefault(trainer.TrainingSettings, "warmup", 100)
    save_every: int = redefault(trainer.TrainingSettings, "save_every", 200)
    val_batches: int = redefault(trainer.TrainingSettings, "val_batches", 20)

    def check(self):
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise UserError("--dim must be a multiple of --n-heads, and --n-heads of --n-kv-heads")


# ----------------------------------------------------------------------------- tokenizer and blocks

def read_documents(path):
    docs = []
    for lineno, obj in read_jsonl(path):
        if not isinstance(obj.get("text"), str):
            raise UserError(f"{path}: line {lineno}: expected a string under 'text'")
        if obj["text"].strip():
            docs.append(obj["text"])
    if not docs:
        raise UserError(f"{path}: no documents")
    return docs


def train_tokenizer(docs, vocab_size, seed):
    """SentencePiece BPE with byte fallback and split digits, as LLaMA's tokenizer: its model's bytes."""
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)  # its sentence sampling: same corpus, same tokenizer
    model = io.BytesIO()
    # Sentences are lines; SentencePiece caps their length, so long lines are wrapped.
    lines = (line[i:i + 2000] for doc in docs for line in doc.splitlines() if line.strip()
             for i in range(0, len(line), 2000))
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines, model_writer=model, model_type="bpe", vocab_size=vocab_size,
            byte_fallback=True, split_digits=True, character_coverage=0.9995,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            input_sentence_size=2_000_000, shuffle_input_sentence=True, seed_sentencepiece_size=1_000_000,
            num_threads=os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as e:  # "Vocabulary size too high", say: the corpus decides what fits
        raise UserError(f"--vocab-size {vocab_size}: SentencePiece cannot train it on this corpus "
                        f"({str(e).strip().splitlines()[-1]})")
    return model.getvalue()


def make_blocks(docs, tokenizer, context):
    """(blocks_NC1, mask_NC): the token stream BOS d1 EOS BOS d2 EOS ... cut into blocks of
    context + 1 with stride context, so every token is a target exactly once; the last block
    is padded with 0 and its padding masked."""
    stream = np.fromiter((t for doc in docs for t in tokenizer.encode(doc, bos=True, eos=True)), np.int32)
    n_blocks = max(1, math.ceil((len(stream) - 1) / context))
    padded = np.zeros(n_blocks * context + 1, np.int32)
    padded[:len(stream)] = stream
    starts = np.arange(n_blocks) * context
    blocks = padded[starts[:, None] + np.arange(context + 1)[None, :]]
    target_pos = starts[:, None] + 1 + np.arange(context)[None, :]  # position of each target
    mask = (target_pos < len(stream)).astype(np.float32)
    return blocks, mask


def batch(blocks, mask, indices):
    b = mx.array(blocks[indices])
    return b[:, :-1], b[:, 1:], mx.array(mask[indices])


# ----------------------------------------------------------------------------- model

def init_weights(model, args, seed):
    """GPT-2-style initialization: N(0, 0.02) everywhere, the projections that write into the
    residual stream (wo, w2) scaled by 1/sqrt(2 * n_layers) so its variance does not grow
    with depth; norms start at one."""
    mx.random.seed(seed)
    residual_std = 0.02 / math.sqrt(2 * args.n_layers)

    def init(path, p):
        if path.endswith("norm.weight"):
            return mx.ones_like(p)
        std = residual_std if path.endswith(("wo.weight", "w2.weight")) else 0.02
        return mx.random.normal(p.shape) * std

    model.update(tree_map_with_path(init, model.parameters()))


def make_optimizer(args):
    schedule = trainer.learning_rate_schedule(args.learning_rate, args.iters, max(args.warmup, 1),
                                              end=args.min_learning_rate)
    # Weight decay on matrices only: decaying norm gains towards zero only hurts.
    return optim.MultiOptimizer([optim.AdamW(schedule, weight_decay=args.weight_decay), optim.AdamW(schedule, weight_decay=0.0)],
                                [lambda name, w: w.ndim == 2])


def save_model(model, args, tokenizer_path, out):
    """Write the model folder atomically (temporary folder, then rename) in convert.py's layout."""
    with utils.folder_replaced_when_done(out) as tmp:
        dtype = getattr(mx, args.dtype)
        weights = {k: v.astype(dtype) for k, v in tree_flatten(model.parameters())}
        utils.atomic_save_arrays(os.path.join(tmp, "weights.npz"), weights)
        config = dict(vars(model.args), dtype=args.dtype)
        utils.write_json(os.path.join(tmp, "config.json"), config)
        shutil.copyfile(tokenizer_path, os.path.join(tmp, "tokenizer.model"))


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = settings.parse(PretrainSettings, argv, DESCRIPTION)
    work = args.out + "-work"  # tokenizer, checkpoints, metrics: what a resume needs
    for folder in (args.out, work):
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise UserError(f"{folder}: exists and is not a folder")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise UserError(f"{args.out}: its parent folder does not exist")
    if args.tokenizer:
        SentencePieceTokenizer(args.tokenizer)  # a bad tokenizer fails now, not after the corpus
    world = distributed.init()  # several ranks when mlx.launch or mpirun started this
    check_model_memory(args, args.micro_batch_size(world))
    outputs = [os.path.join(work, name) for name in ("tokenizer.model", "metrics.jsonl", "loss.png", "manifest.json")]
    with utils.claimed_output(args.out, *outputs) if world.is_writer else contextlib.nullcontext():
        return pretrain(args, work)


def check_model_memory(args, micro_batch_size):
    """A UserError when the model's weights, gradients and Adam's two moments (float32), or a
    micro-batch's activations, would not fit in the memory MLX may use."""
    model_args = model_args_of(args, args.vocab_size)
    n_params = sum(math.prod(s) for s in models.NAMES.shapes(vars(model_args)).values())
    need, limit = 16 * n_params, mx.get_memory_limit()
    if need > limit:
        raise UserError(f"a model of {n_params / 1e9:.1f}B parameters needs about {need / 2**30:.0f} GiB to train, "
                        f"more than the {limit / 2**30:.1f} GiB MLX may use: lower --dim, --n-layers or --hidden-dim")
    trainer.check_memory(model_args, micro_batch_size, args.context)


def model_args_of(args, vocab_size):
    return models.ModelArgs(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads,
                            n_kv_heads=args.n_kv_heads, head_dim=args.dim // args.n_heads,
                            hidden_dim=args.hidden_dim, norm_eps=1e-5, vocab_size=vocab_size,
                            rope_theta=args.rope_theta, context_length=args.context)


def pretrain(args, work):
    """Tokenize the corpus, build the model (or resume it), train, save; returns an exit code."""
    checkpoints = trainer.Checkpoints(os.path.join(work, "checkpoints"), args.keep_checkpoints)
    # These decide the data order, which a resume replays exactly.
    run_meta = {"seed": args.seed, "batch_size": args.batch_size, "context": args.context}
    resumed = trainer.resume(checkpoints, args.resume, run_meta, args.iters) if args.resume else None

    train_docs = read_documents(os.path.join(args.corpus, "train.jsonl"))
    valid_docs = read_documents(os.path.join(args.corpus, "valid.jsonl"))
    tokenizer_path = os.path.join(work, "tokenizer.model")
    world = distributed.current()
    if world.is_writer and (args.tokenizer or not os.path.exists(tokenizer_path)):  # else a resumed run's own
        if args.tokenizer:
            with open(args.tokenizer, "rb") as f:
                tokenizer_bytes = f.read()
        else:
            print(f"Training a {args.vocab_size}-piece tokenizer on {len(train_docs)} documents", file=sys.stderr)
            tokenizer_bytes = train_tokenizer(train_docs, args.vocab_size, args.seed)
        os.makedirs(work, exist_ok=True)  # only now: a run refused before leaves nothing
        with utils.atomic_write(tokenizer_path) as f:
            f.write(tokenizer_bytes)
    world.all_sum(mx.array(0)).item()  # the other ranks read the tokenizer rank 0 has written
    tokenizer = SentencePieceTokenizer(tokenizer_path)

    train_blocks, train_mask = make_blocks(train_docs, tokenizer, args.context)
    val_blocks, val_mask = make_blocks(valid_docs, tokenizer, args.context)
    print(f"Corpus: {int(train_mask.sum())} training tokens in {len(train_blocks)} blocks, "
          f"{int(val_mask.sum())} validation tokens", file=sys.stderr)

    model_args = model_args_of(args, tokenizer.vocab_size)
    model = models.Model(model_args)
    init_weights(model, model_args, args.seed)
    n_params, _ = models.count_parameters(model)
    print(f"Model: {n_params / 1e6:.2f}M parameters", file=sys.stderr)

    optimizer = make_optimizer(args)
    step_fn = trainer.make_train_step(model, optimizer, clip_norm=args.grad_clip,
                                      accumulation=args.grad_accumulation_steps)
    meta = {}
    if resumed:
        path, arrays, meta = resumed
        trainer.restore(path, arrays, model, optimizer)

    n_batches = max(1, len(train_blocks) // args.batch_size)  # whole batches: fixed shapes compile once

    def batch_for_step(step):
        epoch, index = divmod(step - 1, n_batches)
        order = trainer.epoch_order(len(train_blocks), args.seed, epoch)
        return batch(train_blocks, train_mask, order[index * args.batch_size:(index + 1) * args.batch_size])

    def evaluate():
        limit = None if args.val_batches < 0 else args.val_batches * args.batch_size
        return evaluate_blocks(model, val_blocks[:limit], val_mask[:limit], args.batch_size)

    trainer.write_manifest(os.path.join(work, "manifest.json"),
                           {"corpus.train": os.path.join(args.corpus, "train.jsonl"),
                            "corpus.valid": os.path.join(args.corpus, "valid.jsonl"), "tokenizer": tokenizer_path},
                           dataclasses.asdict(args))
    log = trainer.MetricsLog(os.path.join(work, "metrics.jsonl"), os.path.join(work, "loss.png"),
                             resume_step=meta.get("step"))
    try:
        trainer.train(model, optimizer, step_fn, batch_for_step, evaluate,
                      settings.subset(trainer.TrainingSettings, args), checkpoints, log,
                      save_outputs=lambda: save_model(model, args, tokenizer_path, args.out),
                      checkpoint_meta=run_meta, resumed=meta)
    except trainer.Interrupted as stop:
        return stop.report("pretrain.py")
    finally:
        log.close()
    log.plot()
    val = evaluate_blocks(model, val_blocks, val_mask, args.batch_size)
    print(f"Validation loss {val:.3f}, perplexity {math.exp(min(val, 700)):.2f}", file=sys.stderr)
    print(f"Saved the model to {args.out}", file=sys.stderr)
    return 0


def evaluate_blocks(model, blocks, mask, batch_size):
    """Token-weighted mean loss over all the given blocks."""
    return trainer.evaluate(model, (batch(blocks, mask, np.arange(i, min(i + batch_size, len(blocks))))
                                    for i in range(0, len(blocks), batch_size)))


if __name__ == "__main__":
    utils.run_script(main)
