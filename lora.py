"""Fine-tune a converted LLaMA/Mistral model with LoRA or QLoRA, test it, generate with it.

    python lora.py --model mlx_model --train --data data/
    python lora.py --model mlx_model --test
    python lora.py --model mlx_model --prompt "Q: What is ReLU in mlx?"
"""

import argparse
import math
import os
import signal
import sys
import time

import utils  # noqa: F401  (fast BLAS before mlx.core)
from utils import UserError, read_jsonl

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

import models
import trainer

# The example's default folder; without one, the small base model shipped in this repository.
DEFAULT_MODEL = "mlx_model"
SHIPPED_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "base_model")


def build_parser():
    p = argparse.ArgumentParser(description="LoRA / QLoRA fine-tuning, testing and generation.")
    p.add_argument("--config", help="YAML file whose keys are flag names; command-line flags win")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="converted model folder (config.json, weights, tokenizer.model); "
                        "default mlx_model, or the shipped base_model when there is no mlx_model")
    p.add_argument("--compute-dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="dtype to compute in; auto = float32 on the CPU, the stored dtype on a GPU")
    # Generation
    p.add_argument("--prompt", "-p", help="generate from this prompt")
    p.add_argument("--num-tokens", "--max-tokens", "-n", type=int, default=100, help="tokens to generate at most")
    p.add_argument("--temp", type=float, default=0.8, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of tokens with this mass")
    p.add_argument("--write-every", type=int, default=1, help="print generated text every this many tokens")
    # Training
    p.add_argument("--train", action="store_true", help="fine-tune with LoRA")
    p.add_argument("--data", default="data/", help="folder with train.jsonl, valid.jsonl, test.jsonl")
    p.add_argument("--lora-layers", type=int, default=16, help="number of final layers to adapt")
    p.add_argument("--lora-rank", type=int, default=8, help="rank r of the LoRA matrices")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha; the update is scaled by alpha / rank")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input during training")
    p.add_argument("--lora-targets", default="wq,wv", help="comma-separated linears to adapt (wq,wk,wv,wo,w1,w2,w3) or 'all'")
    p.add_argument("--batch-size", type=int, default=4, help="examples per step")
    p.add_argument("--iters", type=int, default=1000, help="training steps")
    p.add_argument("--max-seq-length", type=int, default=2048, help="longer examples are truncated (with a warning)")
    p.add_argument("--mask-prompt", action="store_true", help="loss on the completion only (needs prompt/completion data)")
    p.add_argument("--learning-rate", type=float, default=1e-5, help="Adam learning rate")
    p.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"], help="learning-rate schedule after warm-up")
    p.add_argument("--warmup", type=int, default=0, help="steps of linear warm-up from 0")
    p.add_argument("--grad-checkpoint", action="store_true", help="recompute activations in backward to save memory")
    trainer.add_loop_arguments(p, save_every=100, steps_per_eval=200, val_batches=25)
    p.add_argument("--resume-adapter-file", help="start training from these adapter weights (weights only)")
    p.add_argument("--resume", help="resume from a full-state checkpoint: its path, or 'latest' beside --adapter-file")
    p.add_argument("--adapter-file", default="adapters.npz", help="where adapters are saved and loaded from")
    # Test
    p.add_argument("--test", action="store_true", help="report test loss and perplexity")
    p.add_argument("--test-batches", type=int, default=500, help="test batches; -1 = whole set")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    return p


def parse_args(argv=None):
    """Parse flags; keys of --config YAML become defaults that command-line flags override."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        parser.set_defaults(**read_config(args.config, parser))
        args = parser.parse_args(argv)
    utils.require_positive(args, ("batch_size", "iters", "lora_layers", "max_seq_length", "num_tokens",
                                  "write_every") + trainer.LOOP_COUNTS)
    return args


def read_config(path, parser):
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found")
    except yaml.YAMLError as e:
        raise UserError(f"{path}: invalid YAML ({str(e).splitlines()[0]})")
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a mapping of flag names to values")
    known = {a.dest: a for a in parser._actions}
    defaults = {}
    for key, value in config.items():
        dest = str(key).replace("-", "_")
        if dest not in known or dest in ("help", "config"):
            raise UserError(f"{path}: unknown key '{key}'")
        action = known[dest]
        if action.type is not None and value is not None and not isinstance(value, bool):
            try:
                value = action.type(value)
            except (TypeError, ValueError):
                raise UserError(f"{path}: key '{key}': {value!r} is not a valid {action.type.__name__}")
        if action.choices and value not in action.choices:
            raise UserError(f"{path}: key '{key}': {value!r} is not one of {', '.join(action.choices)}")
        defaults[dest] = value
    return defaults


# ----------------------------------------------------------------------------- data

class Dataset:
    """Tokenized examples of one split: token lists and how many leading tokens are prompt."""

    def __init__(self, path, tokens, prompt_lengths):
        self.path = path
        self.tokens = tokens  # list of list[int], each BOS ... EOS
        self.prompt_lengths = prompt_lengths  # tokens (BOS included) excluded by --mask-prompt

    def __len__(self):
        return len(self.tokens)


def load_split(data_dir, split, tokenizer, max_seq_length, mask_prompt):
    """Read and tokenize `data_dir/split.jsonl`; every defect is a UserError naming file and line."""
    path = os.path.join(data_dir, f"{split}.jsonl")
    tokens, prompt_lengths, truncated = [], [], []
    for lineno, obj in read_jsonl(path):
        toks, n_prompt = tokenize_example(obj, tokenizer, mask_prompt, f"{path}: line {lineno}")
        if len(toks) > max_seq_length:
            truncated.append(len(toks))
            toks = toks[:max_seq_length]
        tokens.append(toks)
        prompt_lengths.append(min(n_prompt, len(toks)))
    if truncated:
        print(f"warning: {path}: {len(truncated)} example(s) longer than --max-seq-length "
              f"{max_seq_length} were truncated (longest {max(truncated)} tokens)", file=sys.stderr)
    return Dataset(path, tokens, prompt_lengths)


def tokenize_example(obj, tokenizer, mask_prompt, where):
    """One JSON object -> (BOS + tokens + EOS, number of prompt tokens to mask)."""
    if "text" in obj:
        text = obj["text"]
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{where}: 'text' must be a non-empty string")
        if mask_prompt:
            raise UserError(f"{where}: --mask-prompt needs 'prompt' and 'completion', this line has 'text'")
        return tokenizer.encode(text, bos=True, eos=True), 0
    if "prompt" in obj and "completion" in obj:
        prompt, completion = obj["prompt"], obj["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion.strip():
            raise UserError(f"{where}: 'prompt' must be a string and 'completion' a non-empty string")
        full = tokenizer.encode(prompt + completion, bos=True, eos=True)
        if not mask_prompt:
            return full, 0
        # Tokenize the joined text (as the model will see it) and mask the tokens it
        # shares with the prompt alone: robust to merges across the boundary.
        alone = tokenizer.encode(prompt, bos=True)
        n_prompt = 0
        while n_prompt < min(len(alone), len(full) - 1) and alone[n_prompt] == full[n_prompt]:
            n_prompt += 1
        return full, n_prompt
    raise UserError(f"{where}: expected key 'text', or 'prompt' and 'completion'")


def batch_plan(dataset, batch_size):
    """Indices grouped into batches of similar length (little padding); the last may be smaller."""
    order = sorted(range(len(dataset)), key=lambda i: (len(dataset.tokens[i]), i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def training_batch_order(n_batches, seed, step):
    """Which batch of the plan training step `step` uses: a fresh shuffle each epoch.

    A pure function of (seed, step), so a resumed run sees the same data order.
    """
    epoch, index = divmod(step, n_batches)
    return int(trainer.epoch_order(n_batches, seed, epoch)[index])


PAD_TO = 32


def make_batch(dataset, indices):
    """Pad a batch; return inputs_BT, targets_BT and mask_BT of the targets that count.

    Target t (the token at t+1) counts when it is a real token and not part of
    a masked prompt: exactly the real target tokens, no padding.
    """
    lengths = [len(dataset.tokens[i]) for i in indices]
    # Inputs padded to a multiple of PAD_TO: the compiled step traces once per shape
    # (about 0.7 s for the shipped model), and the shipped data has 121 batch lengths.
    T = 1 + -(-(max(lengths) - 1) // PAD_TO) * PAD_TO
    batch = np.zeros((len(indices), T), np.int32)
    mask = np.zeros((len(indices), T - 1), np.float32)
    for row, i in enumerate(indices):
        batch[row, :lengths[row]] = dataset.tokens[i]
        first_target = max(dataset.prompt_lengths[i], 1)  # target index j predicts token j+1
        mask[row, first_target - 1:lengths[row] - 1] = 1.0
    batch = mx.array(batch)
    return batch[:, :-1], batch[:, 1:], mx.array(mask)


def evaluate(model, dataset, batch_size, num_batches):
    """Token-weighted mean loss over the first `num_batches` batches (-1: all)."""
    plan = batch_plan(dataset, batch_size)
    if num_batches >= 0:
        plan = plan[:num_batches]
    return trainer.evaluate(model, (make_batch(dataset, indices) for indices in plan))


# ----------------------------------------------------------------------------- training

def run_training(model, data, args):
    """Adapt, train (or resume), save; returns an exit code (non-zero when interrupted)."""
    stem = os.path.splitext(args.adapter_file)[0]
    os.makedirs(os.path.dirname(os.path.abspath(args.adapter_file)), exist_ok=True)
    checkpoints = trainer.Checkpoints(stem + "-checkpoints", args.keep_checkpoints)
    run_meta = {"seed": args.seed, "batch_size": args.batch_size}
    meta, arrays = {}, None
    if args.resume:
        resume_path, arrays, meta = trainer.resume(checkpoints, args.resume, run_meta)
        lora = meta["lora"]
        lora_config = models.apply_lora(model, lora["lora_layers"], tuple(lora["targets"]), lora["rank"],
                                        lora["alpha"], lora["dropout"])
    else:
        lora_config = models.apply_lora(model, args.lora_layers, models.parse_targets(args.lora_targets),
                                        args.lora_rank, args.lora_alpha, args.lora_dropout)
    if args.resume_adapter_file:
        models.load_adapter_weights(model, args.resume_adapter_file)
    model.grad_checkpoint = args.grad_checkpoint
    total, trainable = models.count_parameters(model)
    print(f"Parameters: {total / 1e6:.3f}M total, {trainable / 1e6:.3f}M trainable "
          f"({100 * trainable / total:.3f}%)", file=sys.stderr)

    optimizer = optim.Adam(learning_rate=trainer.learning_rate_schedule(
        args.learning_rate, args.iters, args.warmup, cosine=args.lr_schedule == "cosine"))
    step_fn = trainer.make_train_step(model, optimizer)
    if arrays is not None:
        trainer.restore(resume_path, arrays, model, optimizer)
    trainer.write_manifest(stem + ".manifest.json",
                           {"weights": models.weights_file(args.model),
                            **{f"data.{s}": d.path for s, d in data.items()}},
                           {k: v for k, v in vars(args).items()})
    plan = batch_plan(data["train"], args.batch_size)
    log = trainer.MetricsLog(stem + ".metrics.jsonl", stem + ".loss.png", resume_step=meta.get("step"))
    model.train()
    try:
        trainer.train(
            model, optimizer, step_fn,
            batch_for_step=lambda step: make_batch(data["train"],
                                                   plan[training_batch_order(len(plan), args.seed, step - 1)]),
            evaluate=lambda: evaluate(model, data["valid"], args.batch_size, args.val_batches),
            settings=args, checkpoints=checkpoints, log=log,
            save_outputs=lambda: models.save_adapters(model, args.adapter_file, lora_config),
            checkpoint_meta=dict(run_meta, lora=lora_config), resumed=meta)
    except trainer.Interrupted as stop:
        print(f"Stopped by {signal.Signals(stop.signum).name}; checkpoint {stop.checkpoint}. Resume with:\n"
              f"  python lora.py {' '.join(sys.argv[1:])} --resume latest", file=sys.stderr)
        return 128 + stop.signum
    finally:
        log.close()
        model.eval()
    log.plot()
    print(f"Saved adapters to {args.adapter_file} (metrics {log.path}, plot {log.plot_path})", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- generation

class StreamingDetokenizer:
    """Turns tokens into text as they come, without splitting multi-byte characters.

    Decoding the whole sequence each time keeps SentencePiece's word-leading
    spaces right; text is held back while it ends in an incomplete UTF-8 sequence
    (byte-fallback tokens decode to U+FFFD until the character is complete).
    """

    def __init__(self, tokenizer, prompt_tokens=()):
        self.tokenizer = tokenizer
        self.tokens = list(prompt_tokens)
        # A prompt ending inside a character leaves that character to the stream.
        self.printed = len(tokenizer.decode(self.tokens).rstrip("\ufffd"))

    def add(self, token):
        """Add a token; return the newly completed text (maybe empty)."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):
            return ""
        return self._take(text)

    def flush(self):
        """Return whatever text is left, complete or not."""
        return self._take(self.tokenizer.decode(self.tokens))

    def _take(self, text):
        new, self.printed = text[self.printed:], len(text)
        return new


def sample(logits_V, temp, top_p):
    """Next token: greedy when temp is 0, else temperature and nucleus (top-p) sampling."""
    if temp == 0:
        return mx.argmax(logits_V, axis=-1)
    logits_V = logits_V.astype(mx.float32) / temp
    if top_p < 1.0:
        probs_V = mx.softmax(logits_V, axis=-1)
        order_V = mx.argsort(-probs_V, axis=-1)
        sorted_V = mx.take_along_axis(probs_V, order_V, axis=-1)
        # Keep a token if the mass before it is below top_p (the first is always kept).
        keep_sorted_V = (mx.cumsum(sorted_V, axis=-1) - sorted_V) < top_p
        keep_V = mx.put_along_axis(mx.zeros_like(keep_sorted_V), order_V, keep_sorted_V, axis=-1)
        logits_V = mx.where(keep_V, logits_V, -mx.inf)
    return mx.random.categorical(logits_V)


def generate_tokens(model, prompt_tokens, temp=0.0, top_p=1.0):
    """Yield generated token ids forever (the caller stops), using a KV cache."""
    cache = model.make_cache()
    logits_BTV = model(mx.array([prompt_tokens]), cache)
    token = sample(logits_BTV[0, -1], temp, top_p)
    mx.async_eval(token)
    while True:
        # Queue the next step behind this one before waiting for this token: the CPU
        # goes from one step's last kernel to the next's first without waiting for
        # Python (on this machine 0.5-1 ms a token; the 150M model about 3 % faster).
        # If the caller stops here, one step was computed for nothing.
        next_logits = model(token.reshape(1, 1), cache)
        next_token = sample(next_logits[0, -1], temp, top_p)
        mx.async_eval(next_token)
        yield token.item()
        token = next_token


def generate(model, tokenizer, args):
    """Print the prompt and its continuation as it streams; stop at EOS or --num-tokens."""
    prompt_tokens = tokenizer.encode(args.prompt, bos=True)
    detok = StreamingDetokenizer(tokenizer, prompt_tokens)
    print(args.prompt, end="", flush=True)
    tic = time.perf_counter()
    prompt_time, n, pending = None, 0, ""
    for n, token in enumerate(generate_tokens(model, prompt_tokens, args.temp, args.top_p), start=1):
        if prompt_time is None:
            prompt_time = time.perf_counter() - tic
            tic = time.perf_counter()
        if token == tokenizer.eos_id:
            n -= 1
            break
        pending += detok.add(token)
        if n % args.write_every == 0:
            print(pending, end="", flush=True)
            pending = ""
        if n >= args.num_tokens:
            break
    print(pending + detok.flush(), flush=True)
    gen_time = time.perf_counter() - tic
    print(f"Prompt: {len(prompt_tokens) / prompt_time:.1f} tokens/s ({len(prompt_tokens)} tokens), "
          f"generation: {n / max(gen_time, 1e-9):.1f} tokens/s ({n} tokens)", file=sys.stderr)


# ----------------------------------------------------------------------------- main

def adapters_to_apply(adapter_file):
    """The adapter file --test and --prompt apply, or None for the base model: the
    default file may be missing, a file named explicitly may not."""
    if os.path.exists(adapter_file):
        return adapter_file
    if adapter_file != build_parser().get_default("adapter_file"):
        raise UserError(f"{adapter_file}: adapter file not found")
    print(f"note: no {adapter_file}; using the base model without adapters", file=sys.stderr)
    return None


def main(argv=None):
    args = parse_args(argv)
    if not (args.train or args.test or args.prompt is not None):
        raise UserError("nothing to do: give --train, --test and/or --prompt")
    mx.random.seed(args.seed)
    if args.model == DEFAULT_MODEL and not os.path.isdir(DEFAULT_MODEL):
        args.model = SHIPPED_MODEL
    adapter_file = None if args.train else adapters_to_apply(args.adapter_file)
    print(f"Loading model {args.model}", file=sys.stderr)
    model, tokenizer, _ = models.load_model(args.model, adapter_file, args.compute_dtype,
                                            generation_only=not (args.train or args.test))

    if args.train:
        data = {split: load_split(args.data, split, tokenizer, args.max_seq_length, args.mask_prompt)
                for split in ("train", "valid")}
        if len(data["train"]) == 0:
            raise UserError(f"{data['train'].path}: no training examples")
        if len(data["valid"]) == 0:
            raise UserError(f"{data['valid'].path}: no validation examples")
        code = run_training(model, data, args)
        if code:
            return code

    if args.test:
        test_set = load_split(args.data, "test", tokenizer, args.max_seq_length, args.mask_prompt)
        if len(test_set) == 0:
            raise UserError(f"{test_set.path}: no test examples")
        test_loss = evaluate(model, test_set, args.batch_size, args.test_batches)
        print(f"Test loss {test_loss:.3f}, Test ppl {math.exp(min(test_loss, 700)):.3f}.")

    if args.prompt is not None:
        mx.random.seed(args.seed)
        generate(model, tokenizer, args)


if __name__ == "__main__":
    utils.run_cli(main)
