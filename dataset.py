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
Preference pairs (lora.py --train-mode dpo or orpo) are TRL's format, one of
  {"prompt": "...", "chosen": "...", "rejected": "..."}
                                      the prompt and each answer joined (loss on the answer);
  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
                                      the prompt's turns and each answer's through the chat
                                      template, loss on the answer's assistant turns.
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

    @property
    def lengths(self):
        return [len(t) for t in self.tokens]

    def batch(self, indices):
        return make_batch(self, indices)


class Pairs:
    """Tokenized preference pairs of one split: sequence 2i of `sequences` (a Dataset) is pair i's
    prompt with its chosen answer, sequence 2i + 1 the prompt with its rejected one."""

    def __init__(self, path, sequences):
        self.path = path
        self.sequences = sequences
        self.reference_logps = None  # DPO: N x 2, the reference's log-probabilities of each pair's answers

    def __len__(self):
        return len(self.sequences) // 2

    @property
    def lengths(self):
        """Each pair's longer sequence: what its batch is padded to."""
        lengths = self.sequences.lengths
        return [max(lengths[i], lengths[i + 1]) for i in range(0, len(lengths), 2)]

    def batch(self, indices):
        return make_pair_batch(self, indices)


def load_split(data_dir, split, tokenizer, max_seq_length, mask_prompt, template=None):
    """Read and tokenize `data_dir/split.jsonl`; every defect is a UserError naming file and line.
    `template` is the model's chat template (chat.load_template), or None."""
    path = os.path.join(data_dir, f"{split}.jsonl")
    if template is not None:  # a broken template fails here, not on some line of the data
        chat.check(template, tokenizer, f"the model's {chat.TEMPLATE_FILE}, on a short conversation")
    dataset, too_long = Dataset(path, [], []), []
    for lineno, obj in read_jsonl(path):
        where = f"{path}: line {lineno}"
        if not add_truncated(dataset, *tokenize_example(obj, tokenizer, mask_prompt, where, template),
                             max_seq_length, too_long):
            raise UserError(f"{where}: no reply left within --max-seq-length {max_seq_length}")
    warn_truncated(path, too_long, max_seq_length)
    return dataset


def load_pairs(data_dir, split, tokenizer, max_seq_length, template=None, mode="dpo"):
    """Read and tokenize the preference pairs of `data_dir/split.jsonl` (for --train-mode `mode`);
    every defect is a UserError naming file and line."""
    path = os.path.join(data_dir, f"{split}.jsonl")
    if template is not None:
        chat.check(template, tokenizer, f"the model's {chat.TEMPLATE_FILE}, on a short conversation")
    sequences, too_long = Dataset(path, [], []), []
    for lineno, obj in read_jsonl(path):
        where = f"{path}: line {lineno}"
        for key, (toks, loss) in zip(ANSWERS, tokenize_pair(obj, tokenizer, where, template, mode)):
            if not add_truncated(sequences, toks, loss, max_seq_length, too_long):
                raise UserError(f"{where}: the '{key}' answer is empty after truncation to --max-seq-length "
                                f"{max_seq_length}")
    warn_truncated(path, too_long, max_seq_length)
    return Pairs(path, sequences)


def add_truncated(dataset, toks, loss, max_seq_length, too_long):
    """Append an example to `dataset`, cut to `max_seq_length` tokens (its length before then noted
    in `too_long`); False, and nothing appended, if no token of its loss spans is left."""
    if len(toks) > max_seq_length:
        too_long.append(len(toks))
        toks = toks[:max_seq_length]
        loss = [(s, min(e, max_seq_length)) for s, e in loss if s < max_seq_length]
        if not loss:
            return False
    dataset.tokens.append(toks)
    dataset.spans.append(loss)
    return True


def warn_truncated(path, too_long, max_seq_length):
    if too_long:
        print(f"warning: {path}: {len(too_long)} example(s) longer than --max-seq-length "
              f"{max_seq_length} were truncated (longest {max(too_long)} tokens)", file=sys.stderr)


ANSWERS = ("chosen", "rejected")
PAIR_KEYS = ("prompt",) + ANSWERS
SFT_FORMATS = "'messages', 'text', or 'prompt' and 'completion'"


def tokenize_pair(obj, tokenizer, where, template, mode):
    """One preference line -> [(tokens, loss spans) of the prompt and chosen answer, of the prompt
    and rejected answer]."""
    if not any(k in obj for k in ANSWERS) and any(k in obj for k in ("messages", "text", "completion")):
        raise UserError(f"{where}: a supervised example ({SFT_FORMATS}); --train-mode {mode} needs preference "
                        "pairs: 'prompt', 'chosen' and 'rejected'")
    if (missing := next((k for k in PAIR_KEYS if k not in obj), None)) is not None:
        raise UserError(f"{where}: missing '{missing}' (a preference pair has 'prompt', 'chosen' and 'rejected')")
    prompt, answers = obj["prompt"], [obj[k] for k in ANSWERS]
    if answers[0] == answers[1]:
        raise UserError(f"{where}: 'chosen' and 'rejected' are the same: nothing to prefer")
    if isinstance(prompt, str) and all(isinstance(a, str) for a in answers):
        for key, answer in zip(ANSWERS, answers):
            if not answer.strip():
                raise UserError(f"{where}: '{key}' must be a non-empty string")
        return [joined(tokenizer, prompt, answer) for answer in answers]
    if isinstance(prompt, list) and all(isinstance(a, list) for a in answers):
        if template is None:
            raise UserError(f"{where}: conversational pairs need a model with a chat template, and this one has none")
        for key, answer in zip(ANSWERS, answers):
            checked_messages(prompt + answer, where)
            if not any(m["role"] == "assistant" for m in answer):
                raise UserError(f"{where}: '{key}' has no assistant turn: nothing to learn from")
        return [chat_example(prompt + answer, tokenizer, template, where, first_turn=len(prompt))
                for answer in answers]
    raise UserError(f"{where}: 'prompt', 'chosen' and 'rejected' must be all strings or all lists of messages")


def tokenize_example(obj, tokenizer, mask_prompt, where, template=None):
    """One JSON object -> (tokens, [(start, end) of the tokens that carry loss])."""
    if any(k in obj for k in ANSWERS):
        raise UserError(f"{where}: a preference pair ('prompt', 'chosen', 'rejected'); --train-mode sft needs "
                        f"{SFT_FORMATS} (pairs are for --train-mode dpo or orpo)")
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
        if not mask_prompt:
            full = tokenizer.encode(prompt + completion, bos=True, eos=True)
            return full, [(1, len(full))]
        return joined(tokenizer, prompt, completion)
    raise UserError(f"{where}: expected key 'messages', 'text', or 'prompt' and 'completion'")


def joined(tokenizer, prompt, completion):
    """The tokens of prompt + completion (with BOS and EOS), and the span of the completion's.

    The joined text is tokenized as the model will see it, and the tokens it shares with the
    prompt alone are the prompt's: robust to merges across the boundary.
    """
    full = tokenizer.encode(prompt + completion, bos=True, eos=True)
    alone = tokenizer.encode(prompt, bos=True)
    n_prompt = 0
    while n_prompt < min(len(alone), len(full) - 1) and alone[n_prompt] == full[n_prompt]:
        n_prompt += 1
    return full, [(max(n_prompt, 1), len(full))]


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


def chat_example(messages, tokenizer, template, where, first_turn=0):
    """The conversation through the chat template, and the spans of its assistant turns (those
    from message `first_turn` on: a preference pair's answer, not the turns of its prompt).

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
        if message["role"] != "assistant" or i < first_turn:
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
    lengths = dataset.lengths
    order = sorted(range(len(dataset)), key=lambda i: (lengths[i], i))
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


def make_pair_batch(pairs, indices):
    """A batch of preference pairs: inputs_P2T, targets_P2T and mask_P2T, row 0 of each pair its
    chosen sequence and row 1 its rejected one (make_batch's arrays, a pair's rows kept together so
    that micro-batches and ranks split between pairs, never within one); and ref_logps_P2 once the
    pairs have their reference log-probabilities."""
    arrays = make_batch(pairs.sequences, [j for i in indices for j in (2 * i, 2 * i + 1)])
    batch = tuple(a.reshape(len(indices), 2, a.shape[-1]) for a in arrays)
    if pairs.reference_logps is not None:
        batch += (mx.array(pairs.reference_logps[indices]),)
    return batch
