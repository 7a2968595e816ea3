"""Generation: sampling, the KV-cache decode loop, and text streamed as it completes.

    tokens = generate_tokens(model, prompt_tokens, Sampler(temp=0.7))  # ids, forever
    for piece in stream_text(model, tokenizer, prompt_tokens, 100): ...
    generate(model, tokenizer, prompt_tokens, max_tokens=100)      # prints
"""

import math
import sys
import time
from dataclasses import dataclass

import utils  # noqa: F401  (fast BLAS before mlx.core)
from utils import UserError

import mlx.core as mx

from loading import explain_non_finite
from models import KVCache

# Prompt tokens run through the model at a time: attention's scores then take
# chunk x keys values, not prompt x prompt (a 20,000-token prompt: 2 GB a head).
PREFILL_CHUNK = 512


@dataclass(frozen=True)
class Sampler:
    """How the next token is drawn from the logits, in the order transformers applies them: the
    repetition penalty (a seen token's logit divided by it when positive, multiplied when
    negative, as in the CTRL paper), then greedy when temp is 0, else the temperature, top-k (the
    k likeliest), top-p (the smallest set holding that mass), min-p (tokens at least min_p times
    as likely as the likeliest), and a draw."""
    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: every token
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_context_size: int = 20  # the last tokens (prompt included) the penalty looks at

    @property
    def penalizes(self):
        return self.repetition_penalty != 1.0

    def __call__(self, logits_V, window_H=None):
        """The next token id (an mx scalar) after `window_H`, the last ids seen (the penalty's
        window: the caller keeps it, and only when the sampler penalizes)."""
        if self.penalizes and window_H is not None and window_H.size:
            logits_V = penalized(logits_V, window_H, self.repetition_penalty)
        if self.temp == 0:
            return mx.argmax(logits_V, axis=-1)
        logits_V = logits_V.astype(mx.float32)
        # Shifted to a maximum of 0 first: a tiny temperature then tends to greedy instead of
        # overflowing to infinities whose softmax is NaN.
        return mx.random.categorical(self.filtered((logits_V - logits_V.max(axis=-1, keepdims=True)) / self.temp))

    def filtered(self, logits_V):
        """Tempered logits with the tokens top-k, top-p and min-p leave out set to -inf."""
        if 0 < self.top_k < logits_V.shape[-1]:
            kth = mx.topk(logits_V, self.top_k, axis=-1).min(axis=-1, keepdims=True)
            logits_V = mx.where(logits_V >= kth, logits_V, -mx.inf)
        if self.top_p < 1.0:
            probs_V = mx.softmax(logits_V, axis=-1)
            order_V = mx.argsort(-probs_V, axis=-1)
            sorted_V = mx.take_along_axis(probs_V, order_V, axis=-1)
            # Keep a token if the mass before it is below top_p (the first is always kept).
            keep_sorted_V = (mx.cumsum(sorted_V, axis=-1) - sorted_V) < self.top_p
            keep_V = mx.put_along_axis(mx.zeros_like(keep_sorted_V), order_V, keep_sorted_V, axis=-1)
            logits_V = mx.where(keep_V, logits_V, -mx.inf)
        if self.min_p > 0.0:
            # p >= min_p * p_max  <=>  logit >= logit_max + log(min_p)
            floor = logits_V.max(axis=-1, keepdims=True) + math.log(self.min_p)
            logits_V = mx.where(logits_V >= floor, logits_V, -mx.inf)
        return logits_V


GREEDY = Sampler()


def penalized(logits_V, seen_H, penalty):
    """Logits with each token of `seen_H` made less likely by `penalty` (> 1), once however often
    it was seen."""
    seen = logits_V[seen_H]
    return mx.put_along_axis(logits_V, seen_H, mx.where(seen > 0, seen / penalty, seen * penalty), axis=-1)


def prefill(model, prompt_tokens, cache):
    """Run the prompt into `cache`, PREFILL_CHUNK tokens at a time; the logits after its last token."""
    for start in range(0, len(prompt_tokens), PREFILL_CHUNK):
        logits_BTV = model(mx.array([prompt_tokens[start:start + PREFILL_CHUNK]]), cache)
        if start + PREFILL_CHUNK < len(prompt_tokens):
            mx.eval([(c.keys, c.values) for c in cache])  # one chunk's graph at a time
    return logits_BTV[0, -1]


def generate_tokens(model, prompt_tokens, sampler=GREEDY):
    """Yield generated token ids forever (the caller stops), using a KV cache."""
    if not prompt_tokens:
        raise UserError("nothing to continue: the prompt is empty and the model has no BOS token")
    cache = model.make_cache()
    logits_V = prefill(model, prompt_tokens, cache)
    if not mx.isfinite(logits_V).all().item():
        explain_non_finite(model, "the prompt's logits")
    # The ids the repetition penalty looks at, kept as an array (the next step is queued
    # before this token is known), and only when there is a penalty: decoding's hot path.
    size = sampler.repetition_context_size
    window_H = mx.array(prompt_tokens[-size:], dtype=mx.int32) if sampler.penalizes else None
    token = sampler(logits_V, window_H)
    mx.async_eval(token)
    while True:
        # Queue the next step before waiting for this token: the CPU goes from one
        # step's last kernel to the next's first without waiting for Python. If the
        # caller stops here, one step was computed for nothing.
        if window_H is not None:
            window_H = mx.concatenate([window_H, token.reshape(1).astype(mx.int32)])[-size:]
        next_logits = model(token.reshape(1, 1), cache)
        next_token = sampler(next_logits[0, -1], window_H)
        mx.async_eval(next_token)
        yield token.item()
        token = next_token


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


@dataclass
class Timing:
    """What stream_text measured: the prompt's tokens and seconds, then the generated ones'."""
    prompt_tokens: int = 0
    prompt_s: float = 0.0
    tokens: int = 0
    generation_s: float = 0.0  # from the first generated token (which comes with the prompt) to the last

    def prompt_tokens_per_s(self):
        return self.prompt_tokens / max(self.prompt_s, 1e-9)

    def tokens_per_s(self):
        return (self.tokens - 1) / self.generation_s if self.tokens > 1 else 0.0


def tokens_that_fit(args, n_prompt, max_tokens):
    """How many tokens to generate after a prompt of n_prompt: max_tokens, cut at the
    model's context length when its checkpoint gives one (said on stderr). A UserError
    when the prompt alone fills the context, or the KV cache and the prompt's attention
    would need more memory than MLX may use."""
    if args.context_length is not None:
        if n_prompt >= args.context_length:
            raise UserError(f"the prompt is {n_prompt} tokens, the model's context only {args.context_length}: "
                            "shorten the prompt")
        if n_prompt + max_tokens > args.context_length:
            max_tokens = args.context_length - n_prompt
            print(f"note: generating at most {max_tokens} tokens, up to the model's context of "
                  f"{args.context_length}", file=sys.stderr)
    need = generation_bytes(args, n_prompt + max_tokens)
    free = mx.get_memory_limit() - mx.get_active_memory()
    if need > free:
        raise UserError(f"a prompt of {n_prompt} tokens and {max_tokens} more to generate need about "
                        f"{need / 2**30:.1f} GiB for the KV cache and attention, more than the {free / 2**30:.1f} "
                        "GiB free: shorten the prompt or lower --max-tokens")
    return max_tokens


def generation_bytes(args, total):
    """Memory of a KV cache of `total` positions (float32) and of one prefill chunk's attention scores."""
    kept = total if args.sliding_window is None else min(total, args.sliding_window + PREFILL_CHUNK + KVCache.step)
    cache = args.n_layers * 2 * args.n_kv_heads * args.head_dim * 4 * kept
    scores = 2 * args.n_heads * min(total, PREFILL_CHUNK) * kept * 4
    return cache + scores


def stream_text(model, tokenizer, prompt_tokens, max_tokens, sampler=GREEDY, timing=None):
    """Yield the continuation of `prompt_tokens` as text, one piece per generated token
    (empty while a character is incomplete) and what is left at the end; stop at EOS
    or after `max_tokens` tokens (or the model's context: tokens_that_fit). `timing`,
    if given, is filled in as it goes."""
    max_tokens = tokens_that_fit(model.args, len(prompt_tokens), max_tokens)
    timing = timing if timing is not None else Timing()
    timing.prompt_tokens = len(prompt_tokens)
    detok = StreamingDetokenizer(tokenizer, prompt_tokens)
    tic = time.perf_counter()
    for n, token in enumerate(generate_tokens(model, prompt_tokens, sampler), start=1):
        if n == 1:  # the first token comes with the prompt
            timing.prompt_s = time.perf_counter() - tic
            tic = time.perf_counter()
        if token in tokenizer.eos_ids:
            break
        timing.tokens, timing.generation_s = n, time.perf_counter() - tic
        yield detok.add(token)
        if n >= max_tokens:
            break
    yield detok.flush()


def generate(model, tokenizer, prompt_tokens, max_tokens=100, sampler=GREEDY, write_every=1, echo=""):
    """Print `echo` (the prompt's text, or nothing for a chat) and the continuation of
    `prompt_tokens` as it streams, then the speed on stderr."""
    print(echo, end="", flush=True)
    timing, pending = Timing(), ""
    for n, piece in enumerate(stream_text(model, tokenizer, prompt_tokens, max_tokens, sampler, timing), 1):
        pending += piece
        if n % write_every == 0:
            print(pending, end="", flush=True)
            pending = ""
    print(pending, flush=True)
    print(f"Prompt: {timing.prompt_tokens_per_s():.1f} tokens/s ({timing.prompt_tokens} tokens), "
          f"generation: {timing.tokens_per_s():.1f} tokens/s ({timing.tokens} tokens)",
          file=sys.stderr)
