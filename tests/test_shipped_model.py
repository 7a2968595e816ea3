"""The base model shipped in base_model/: loads, fits its config, generates deterministically."""

import json
import os

import mlx.core as mx
import numpy as np

import trainer
import loading
import generate
from helpers import sampled

SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "base_model")


def test_shipped_model_is_small_and_in_convert_layout():
    names = sorted(os.listdir(SHIPPED))
    assert names == ["config.json", "tokenizer.model", "weights.npz"]
    assert sum(os.path.getsize(os.path.join(SHIPPED, n)) for n in names) <= 20 * 2**20


def test_shipped_model_config_matches_its_weights():
    config = json.load(open(os.path.join(SHIPPED, "config.json")))
    weights = mx.load(os.path.join(SHIPPED, "weights.npz"))
    assert weights["tok_embeddings.weight"].shape == (config["vocab_size"], config["dim"])
    assert weights["layers.0.attention.wk.weight"].shape == (config["n_kv_heads"] * config["head_dim"], config["dim"])
    assert weights["layers.0.feed_forward.w1.weight"].shape == (config["hidden_dim"], config["dim"])
    assert len({k.split(".")[1] for k in weights if k.startswith("layers.")}) == config["n_layers"]
    model, tokenizer, _ = loading.load_model(SHIPPED)  # checks every other shape
    assert tokenizer.vocab_size == config["vocab_size"]


def greedy(model, tokenizer, prompt, n):
    out = []
    for token in generate.generate_tokens(model, tokenizer.encode(prompt)):
        if token == tokenizer.eos_id or len(out) == n:
            break
        out.append(token)
    return out


def test_shipped_model_generates_deterministically_and_knows_docstrings():
    model, tokenizer, _ = loading.load_model(SHIPPED)
    prompt = "numpy.linalg.norm(x, ord=None, axis=None) Matrix or vector norm."
    prompt_tokens = tokenizer.encode(prompt)
    assert sampled(model, prompt_tokens, seed=1) == sampled(model, prompt_tokens, seed=1)
    assert sampled(model, prompt_tokens, seed=1) != sampled(model, prompt_tokens, seed=2)
    assert len(greedy(model, tokenizer, prompt, 40)) > 10  # no EOS straight away
    # A pretrained model puts far more probability on real documentation than on shuffled words.
    text = "Return the sum of the array elements over the given axis."
    words = text.split()
    shuffled = " ".join(words[i] for i in np.random.default_rng(0).permutation(len(words)))
    nll = lambda t: float(trainer.loss_fn(model, *make_example(tokenizer, t))[0])  # noqa: E731
    assert nll(text) < nll(shuffled) - 0.5


def make_example(tokenizer, text):
    tokens = mx.array([tokenizer.encode(text, eos=True)])
    return tokens[:, :-1], tokens[:, 1:], mx.ones((1, tokens.shape[1] - 1))
