"""Fine-tuning data: JSONL splits tokenized into examples, batched with loss masks.

A split is `folder/train.jsonl` (or valid, test): one JSON object a line, one of
  {"text": ...}                       loss on every token;
  {"prompt": ..., "completion": ...}  through the model's chat template as one user /
                                      assistant exchange when it has one (loss on the
                                      reply); else joined (loss on all, or with
                                      --mask-prompt on the completion);
  {"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}
                                      through the chat template, loss on every
                                      assistant turn and nothing else.
Every defect is a UserError naming the file and line.
"""

import os
import sys

import utils  # noqa: F401  (fast BLAS before mlx.core)
from utils import UserError, read_jsonl

import mlx.core as mx
import numpy as np

import chat
import trainer

ROLES = ("system", "user", "assistant")


class Dataset:
    """Tokenized examples of one split: token lists, and the spans of tokens that carry loss."""

    def __init__(self, path, tokens, spans):
        self.path = path
        self.tokens = tokens  # list of list[int]
        self.spans = spans  # per example, [(start, end), ...]: tokens start..end-1 are targets

    def __len__(self):
        return len(self.tokens)


def load_split(data_dir, split, tokenizer, max_seq_length, mask_prompt, template=None):
    """Read and tokenize `data_dir/split.jsonl`; every defect is a UserError naming file and line.
    `template` is the model's chat template (chat.load_template), or None."""
    path = os.path.join(data_dir, f"{split}.jsonl")
    if template is not None:  # a broken template fails here, not on some line of the data
        chat.check(template, tokenizer, f"the model's {chat.TEMPLATE_FILE}, on a short conversation")
    tokens, spans, truncated = [], [], []
    for lineno, obj in read_jsonl(path):
        where = f"{path}: line {lineno}"
        toks, loss = tokenize_example(obj, tokenizer, mask_prompt, where, template)
        if len(toks) > max_seq_length:
            truncated.append(len(toks))
            toks = toks[:max_seq_length]
            loss = [(s, min(e, max_seq_length)) for s, e in loss if s < max_seq_length]
            if not loss:
                raise UserError(f"{where}: no reply left within --max-seq-length {max_seq_length}")
        tokens.append(toks)
        spans.append(loss)
    if truncated:
        print(f"warning: {path}: {len(truncated)} example(s) longer than --max-seq-length "
              f"{max_seq_length} were truncated (longest {max(truncated)} tokens)", file=sys.stderr)
    return Dataset(path, tokens, spans)


def tokenize_example(obj, tokenizer, mask_prompt, where, template=None):
    """One JSON object -> (tokens, [(start, end) of the tokens that carry loss])."""
    if "messages" in obj:
        if template is None:
            raise UserError(f"{where}: 'messages' need a model with a chat template, and this one has none")
        return chat_example(checked_messages(obj["messages"], where), tokenizer, template, where)
    if "text" in obj:
        text = obj["text"]
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{where}: 'text' must be a non-empty string")
        if mask_prompt:
            raise UserError(f"{where}: --mask-prompt needs 'prompt' and 'completion', this line has 'text'")
        full = tokenizer.encode(text, bos=True, eos=True)
        return full, [(1, len(full))]
    if "prompt" in obj and "completion" in obj:
        prompt, completion = obj["prompt"], obj["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion.strip():
            raise UserError(f"{where}: 'prompt' must be a string and 'completion' a non-empty string")
        if template is not None:
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            return chat_example(messages, tokenizer, template, where)
        full = tokenizer.encode(prompt + completion, bos=True, eos=True)
        if not mask_prompt:
            return full, [(1, len(full))]
        # Tokenize the joined text (as the model will see it) and mask the tokens it
        # shares with the prompt alone: robust to merges across the boundary.
        alone = tokenizer.encode(prompt, bos=True)
        n_prompt = 0
        while n_prompt < min(len(alone), len(full) - 1) and alone[n_prompt] == full[n_prompt]:
            n_prompt += 1
        return full, [(max(n_prompt, 1), len(full))]
    raise UserError(f"{where}: expected key 'messages', 'text', or 'prompt' and 'completion'")


def checked_messages(messages, where):
    """A conversation: a list of {"role", "content"} with known roles and string contents,
    and at least one assistant turn to learn from."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - {"role", "content"} or "role" not in message:
            raise UserError(f"{where}: message {i + 1} must be an object with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise UserError(f"{where}: message {i + 1} has the unknown role {message['role']!r} "
                            f"(expected {', '.join(ROLES)})")
        if not isinstance(message.get("content"), str):
            raise UserError(f"{where}: message {i + 1}'s 'content' must be a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: no assistant turn: nothing to learn from")
    return messages


def chat_example(messages, tokenizer, template, where):
    """The conversation through the chat template, and the spans of its assistant turns.

    A turn's tokens run from the end of the conversation before it rendered with the
    assistant's header (add_generation_prompt) to the end of the conversation up to it:
    its reply and whatever closes the turn (<|im_end|>, <|eot_id|>), which teaches the
    model to stop. Where a turn reads otherwise as the last one (Qwen3 adds an empty
    thinking block there, Phi-3 closes the conversation with EOS), it ends at its first
    end token. The template writes BOS itself where the model has one.
    """
    def tokens_of(upto, prompt):
        return tokenizer.encode(chat.render(template, messages[:upto], tokenizer, prompt, where), bos=False)

    full = tokens_of(len(messages), False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = tokens_of(i, True), tokens_of(i + 1, False)
        end = len(through) if full[:len(through)] == through else _first_end(full, len(before), tokenizer.eos_ids)
        if full[:len(before)] != before or end is None:
            raise UserError(f"{where}: the chat template renders the start of this conversation differently "
                            "alone than within it: cannot tell which tokens are the replies")
        spans.append((len(before), end))
    return full, spans


def _first_end(tokens, start, eos_ids):
    """Just past the first end token from `start` on, or None."""
    return next((i + 1 for i in range(start, len(tokens)) if tokens[i] in eos_ids), None)


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

    Target t (the token at t+1) counts when token t+1 lies in one of the example's loss
    spans: exactly the tokens to learn, never padding.
    """
    lengths = [len(dataset.tokens[i]) for i in indices]
    # Inputs padded to a multiple of PAD_TO: the compiled step traces once per shape,
    # so a few shapes instead of one per batch length.
    T = 1 + -(-(max(lengths) - 1) // PAD_TO) * PAD_TO
    batch = np.zeros((len(indices), T), np.int32)
    mask = np.zeros((len(indices), T - 1), np.float32)
    for row, i in enumerate(indices):
        batch[row, :lengths[row]] = dataset.tokens[i]
        for start, end in dataset.spans[i]:
            mask[row, start - 1:end - 1] = 1.0  # target index j predicts token j+1
    batch = mx.array(batch)
    return batch[:, :-1], batch[:, 1:], mx.array(mask)
