"""Streaming detokenization, sampling and stopping at EOS."""

import os
import types

import mlx.core as mx
import numpy as np
import pytest

import loading
import generate
import models
import tokenizer as tokenizer_module
from checkpoints import ASSETS, make_tokenizer

# What generate reads of a model whose tokens a test fakes: its shape, for the memory check.
STAND_IN = types.SimpleNamespace(args=models.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                                                       hidden_dim=128, norm_eps=1e-5, vocab_size=320))
TEXTS = ["Once upon a time", " héllo wörld", " 日本語のテキスト", " emoji 🙂🎉 end", "  two  spaces\nand a newline",
         "ß→∑ mixed ✓ 12 34"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    found = {"tiny": tokenizer_module.SentencePieceTokenizer(make_tokenizer(tmp_path_factory.mktemp("tok")))}
    mistral = os.path.join(ASSETS, "tokenizers", "mistral-7b-v0.1.model")
    if os.path.exists(mistral):
        found["mistral"] = tokenizer_module.SentencePieceTokenizer(mistral)
    return found


def stream(tokenizer, prompt_ids, new_ids):
    detok = generate.StreamingDetokenizer(tokenizer, prompt_ids)
    chunks = [detok.add(t) for t in new_ids]
    chunks.append(detok.flush())
    return chunks


@pytest.mark.parametrize("name", ["tiny", "mistral"])
@pytest.mark.parametrize("prompt, continuation", [("Once", TEXTS[1]), ("Hi", TEXTS[2]), ("A", TEXTS[3]),
                                                  ("x", TEXTS[4]), ("Q:", TEXTS[5])])
def test_streamed_text_equals_full_decode(tokenizers, name, prompt, continuation):
    if name not in tokenizers:
        pytest.skip("../shared/assets/tokenizers is not available")
    tok = tokenizers[name]
    n_prompt = len(tok.encode(prompt))
    ids = tok.encode(prompt + continuation)
    chunks = stream(tok, ids[:n_prompt], ids[n_prompt:])
    assert tok.decode(ids[:n_prompt]) + "".join(chunks) == tok.decode(ids)  # what the user sees
    assert not any("\ufffd" in c for c in chunks), chunks  # no half characters printed


def test_byte_fallback_characters_are_held_until_complete(tokenizers):
    tok = tokenizers["tiny"]
    ids = tok.encode("🙂", bos=False)
    assert len(ids) >= 4  # four byte pieces: the test tokenizer has no emoji piece
    chunks = stream(tok, [tok.bos_id], ids)
    assert chunks == [""] * (len(ids) - 1) + ["🙂", ""]  # nothing until the last byte, then all of it


def test_word_leading_space_is_kept(tokenizers):
    if "mistral" not in tokenizers:
        pytest.skip("../shared/assets/tokenizers is not available")
    tok = tokenizers["mistral"]
    prompt = tok.encode("Hello")
    world = tok.encode("Hello world")[len(prompt):]
    assert "".join(stream(tok, prompt, world)) == " world"


def test_greedy_sampling_is_argmax():
    logits = mx.array([0.1, 3.0, -1.0, 2.9])
    assert generate.GREEDY(logits).item() == 1


@pytest.mark.parametrize("temp", [1e-308, 1e-45, 1e-30])
def test_a_vanishing_temperature_draws_the_likeliest_token(temp):
    """T -> 0 is greedy; 1/T overflowing float32 must not turn the logits into NaN."""
    mx.random.seed(0)
    logits = mx.random.normal((300,), key=mx.random.key(5)) * 10
    assert {generate.Sampler(temp=temp)(logits).item() for _ in range(20)} == {generate.GREEDY(logits).item()}


def test_top_p_keeps_only_the_nucleus():
    mx.random.seed(0)
    logits = mx.log(mx.array([0.5, 0.3, 0.15, 0.05]))
    draws = {generate.Sampler(temp=1.0, top_p=0.7)(logits).item() for _ in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.7; the tail is cut
    draws = {generate.Sampler(temp=1.0)(logits).item() for _ in range(400)}
    assert draws == {0, 1, 2, 3}


def test_top_k_1_is_greedy_and_top_k_keeps_the_k_likeliest():
    logits = mx.random.normal((300,), key=mx.random.key(3))
    mx.random.seed(0)
    assert all(generate.Sampler(temp=1.5, top_k=1)(logits).item() == generate.GREEDY(logits).item()
               for _ in range(50))
    kept = generate.Sampler(temp=1.0, top_k=5).filtered(logits)
    assert set(np.flatnonzero(np.isfinite(np.array(kept)))) == set(np.argsort(-np.array(logits))[:5])


def test_min_p_keeps_the_tokens_at_least_that_fraction_as_likely_as_the_likeliest():
    probs = np.array([0.5, 0.3, 0.12, 0.05, 0.03], np.float32)
    kept = generate.Sampler(temp=1.0, min_p=0.2).filtered(mx.log(mx.array(probs)))
    assert list(np.isfinite(np.array(kept))) == list(probs >= 0.2 * probs.max())  # 0.1 and above
    # What is kept keeps its relative odds: the distribution renormalized over the kept tokens.
    np.testing.assert_allclose(np.array(mx.softmax(kept)), np.where(probs >= 0.1, probs, 0) / probs[:3].sum(),
                               rtol=1e-6)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_once():
    logits = mx.array([2.0, -1.0, 0.5, 3.0])
    seen = mx.array([0, 1, 1], dtype=mx.int32)  # token 1 twice: penalized once
    np.testing.assert_allclose(np.array(generate.penalized(logits, seen, 2.0)), [1.0, -2.0, 0.5, 3.0])
    # It changes greedy choices: 3.0 penalized by 4 falls below 2.0.
    assert generate.Sampler(repetition_penalty=4.0)(logits, mx.array([3], dtype=mx.int32)).item() == 0
    # A penalty of 1 changes nothing.
    np.testing.assert_array_equal(np.array(generate.penalized(logits, seen, 1.0)), np.array(logits))


def test_repetition_penalty_reaches_back_only_over_its_context(tiny_llama):
    """Generation with the penalty is greedy decoding over logits penalized for the last
    repetition_context_size tokens (prompt included), as a full forward computes them."""
    model, _, _ = loading.load_model(tiny_llama[0])
    prompt = [1, 5, 9, 13]

    def first(sampler, n=12):
        out = []
        for token in generate.generate_tokens(model, prompt, sampler):
            out.append(token)
            if len(out) == n:
                return out

    greedy = first(generate.GREEDY)
    penalized = first(generate.Sampler(repetition_penalty=3.0, repetition_context_size=6))
    tokens = list(prompt)
    for _ in range(12):
        logits_V = model(mx.array([tokens]))[0, -1]
        seen = mx.array(tokens[-6:], dtype=mx.int32)
        tokens.append(mx.argmax(generate.penalized(logits_V, seen, 3.0)).item())
    assert penalized == tokens[len(prompt):] and penalized != greedy


def test_lora_py_sampling_flags_reach_the_sampler():
    import lora

    args = lora.parse_args(["--prompt", "x", "--temp", "0.7", "--top-p", "0.9", "--top-k", "3", "--min-p", "0.2",
                            "--repetition-penalty", "1.3", "--repetition-context-size", "7"])
    assert lora.sampler_of(args) == generate.Sampler(temp=0.7, top_p=0.9, top_k=3, min_p=0.2,
                                                     repetition_penalty=1.3, repetition_context_size=7)


def test_generation_stops_at_eos(tokenizers, monkeypatch, capsys):
    tok = tokenizers["tiny"]
    words = tok.encode("the cat", bos=False)  # "▁the ▁cat": SentencePiece adds the space

    def fake_tokens(model, prompt, sampler):
        yield from words + [tok.eos_id] + tok.encode("never printed", bos=False)

    monkeypatch.setattr(generate, "generate_tokens", fake_tokens)
    generate.generate(STAND_IN, tok, tok.encode("Once"), max_tokens=50, echo="Once")
    out = capsys.readouterr()
    assert out.out == "Once the cat\n"
    assert f"({len(words)} tokens)" in out.err


def test_generation_respects_num_tokens(tokenizers, monkeypatch, capsys):
    tok = tokenizers["tiny"]
    letters = tok.encode("a b c d e f g h", bos=False)
    monkeypatch.setattr(generate, "generate_tokens", lambda *a: iter(letters))
    generate.generate(STAND_IN, tok, tok.encode("x"), max_tokens=3, write_every=2, echo="x")
    out = capsys.readouterr()
    assert "(3 tokens)" in out.err
    assert out.out == "x" + tok.decode(tok.encode("x") + letters[:3])[1:] + "\n"


def test_generate_tokens_uses_the_cache_like_a_full_forward(tiny_llama):
    model, _, _ = loading.load_model(tiny_llama[0])
    prompt = [1, 5, 9, 13]
    tokens = []
    for t in generate.generate_tokens(model, prompt):
        tokens.append(t)
        if len(tokens) == 12:
            break
    seq = list(prompt)
    for _ in range(12):  # recompute from scratch each time: no cache
        seq.append(int(np.argmax(np.array(model(mx.array([seq]))[0, -1]))))
    assert tokens == seq[len(prompt):]
