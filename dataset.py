"""Fine-tuning data: JSONL splits tokenized into examples, batched with loss masks.

A split is `folder/train.jsonl` (or valid, test): one JSON object a line, either
{"text": ...} or {"prompt": ..., "completion": ...}. Every defect is a UserError
naming the file and line.
"""

import os
import sys

import utils  # noqa: F401  (fast BLAS before mlx.core)
from utils import UserError, read_jsonl

import mlx.core as mx
import numpy as np

import trainer


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
    # Inputs padded to a multiple of PAD_TO: the compiled step traces once per shape,
    # so a few shapes instead of one per batch length.
    T = 1 + -(-(max(lengths) - 1) // PAD_TO) * PAD_TO
    batch = np.zeros((len(indices), T), np.int32)
    mask = np.zeros((len(indices), T - 1), np.float32)
    for row, i in enumerate(indices):
        batch[row, :lengths[row]] = dataset.tokens[i]
        first_target = max(dataset.prompt_lengths[i], 1)  # target index j predicts token j+1
        mask[row, first_target - 1:lengths[row] - 1] = 1.0
    batch = mx.array(batch)
    return batch[:, :-1], batch[:, 1:], mx.array(mask)
