"""The MLX model against an independent reference forward, the KV cache, quantization, the real model."""

import subprocess
import sys

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn

import models
import loading
import generate
import ops
from mlx.utils import tree_flatten
from checkpoints import make_checkpoint, reference_logits
from conftest import convert_checkpoint
from helpers import LORA

TOKENS = np.random.default_rng(0).integers(3, 320, size=(2, 40))  # longer than Mistral's test window 16


def mlx_logits(model, tokens):
    return np.array(model(mx.array(tokens)).astype(mx.float32))


@pytest.mark.parametrize("flavour, n_shards", [("llama1", 1), ("llama2", 1), ("llama2", 2),
                                              ("mistral", 1), ("mistral", 2), ("codellama", 1)])
def test_logits_match_meta_reference(tmp_path, flavour, n_shards):
    ckpt = make_checkpoint(tmp_path / "torch", flavour, n_shards=n_shards, seed=3)
    model, _, config = loading.load_model(convert_checkpoint(tmp_path / "torch", tmp_path / "mlx"))
    expected = reference_logits(ckpt.state_dict, ckpt.config, TOKENS)
    assert np.abs(mlx_logits(model, TOKENS) - expected).max() <= 1e-4
    assert config["sliding_window"] == ckpt.config["sliding_window"]


def test_sharded_model_equals_unsharded(tmp_path):
    for n in (1, 2):
        make_checkpoint(tmp_path / f"torch{n}", "mistral", n_shards=n, seed=5)
    one, _, _ = loading.load_model(convert_checkpoint(tmp_path / "torch1", tmp_path / "mlx1"))
    two, _, _ = loading.load_model(convert_checkpoint(tmp_path / "torch2", tmp_path / "mlx2"))
    np.testing.assert_array_equal(mlx_logits(one, TOKENS), mlx_logits(two, TOKENS))


def test_sliding_window_changes_the_result(tmp_path):
    """Guards the test above: with T > W the window must matter, or it tests nothing."""
    ckpt = make_checkpoint(tmp_path / "torch", "mistral", seed=3)
    unwindowed = dict(ckpt.config, sliding_window=None)
    windowed = reference_logits(ckpt.state_dict, ckpt.config, TOKENS)
    assert np.abs(windowed - reference_logits(ckpt.state_dict, unwindowed, TOKENS))[:, 20:].max() > 1e-2


@pytest.mark.parametrize("flavour", ["llama2", "mistral"])
@pytest.mark.parametrize("chunks", [[1] * 40, [10] + [1] * 30, [7, 7, 7, 7, 7, 5], [25, 1, 14]])
def test_kv_cache_decoding_reproduces_full_logits(tmp_path, flavour, chunks):
    make_checkpoint(tmp_path / "torch", flavour, seed=4)
    model, _, _ = loading.load_model(convert_checkpoint(tmp_path / "torch", tmp_path / "mlx"))
    full = mlx_logits(model, TOKENS)
    cache, pieces, start = model.make_cache(), [], 0
    for size in chunks:
        pieces.append(mlx_logits_cached(model, TOKENS[:, start:start + size], cache))
        start += size
    assert np.abs(np.concatenate(pieces, axis=1) - full).max() <= 1e-4


def mlx_logits_cached(model, tokens, cache):
    return np.array(model(mx.array(tokens), cache))


def test_sliding_window_cache_stays_bounded(tmp_path):
    make_checkpoint(tmp_path / "torch", "mistral", seed=4, sliding_window=8)
    model, _, _ = loading.load_model(convert_checkpoint(tmp_path / "torch", tmp_path / "mlx"))
    cache = model.make_cache()
    models.KVCache.step, old_step = 16, models.KVCache.step
    try:
        for t in range(200):
            model(mx.array([[5 + t % 100]]), cache)
    finally:
        models.KVCache.step = old_step
    assert cache[0].offset == 200
    assert cache[0].keys.shape[2] <= 8 + 16  # the window plus one growth step, not 200


@pytest.mark.parametrize("bits, max_rel_error, min_top1", [(8, 0.03, 0.9), (4, 0.35, 0.6)])
def test_quantized_logits_stay_close(tmp_path, bits, max_rel_error, min_top1):
    """Affine quantization in groups of 32 rounds each weight to a step of (max - min) / (2^bits - 1);
    for Gaussian weights the range of 32 is about 4.1 sigma, so the rounding noise is
    4.1 / (2^bits - 1) / sqrt(12) of a weight's scale: 0.46 % at 8 bits, 7.9 % at 4 bits.
    Compounded through embedding, two layers and the output, we measured relative logit
    errors of 1.1-1.2 % (8-bit) and 19-21 % (4-bit) over three seeds; the bounds leave margin."""
    make_checkpoint(tmp_path / "torch", "llama2", seed=6)
    dense, _, _ = loading.load_model(convert_checkpoint(tmp_path / "torch", tmp_path / "dense"))
    quant, _, config = loading.load_model(convert_checkpoint(
        tmp_path / "torch", tmp_path / f"q{bits}", quantize=True, q_bits=bits, q_group_size=32))
    assert config["quantization"] == {"group_size": 32, "bits": bits}
    assert isinstance(quant.layers[0].attention.wq, nn.QuantizedLinear)
    ref, got = mlx_logits(dense, TOKENS), mlx_logits(quant, TOKENS)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= max_rel_error
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= min_top1


def test_stories260k_greedy_generation(stories_model):
    model, tokenizer, _ = loading.load_model(stories_model)
    prompt = tokenizer.encode("Once upon a time")
    out = []
    for token in generate.generate_tokens(model, prompt):
        if token == tokenizer.eos_id or len(out) == 30:
            break
        out.append(token)
    text = tokenizer.decode(prompt + out)
    assert text.startswith("Once upon a time, there was a little girl named Lily. "
                           "She loved to play outside in the park.")


def test_stories260k_cli_streams_and_reports_speed(stories_model, tmp_path):
    def run_lora(*flags):
        # In an empty folder: no adapters.npz there, so the base model is used.
        return subprocess.run([sys.executable, LORA, "--model", stories_model, "--prompt", "Once upon a time",
                               "--temp", "0", "-n", "24", *flags], cwd=tmp_path, capture_output=True, text=True)

    run = run_lora("--adapter-file", "none.npz")
    assert run.returncode != 0 and "none.npz: adapter file not found" in run.stderr
    run = run_lora("--write-every", "5")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("Once upon a time, there was a little girl named Lily.")
    assert "tokens/s" in run.stderr


# ----------------------------------------------------------------------------- LoRALinear

def lora_reference(x, dense_weight, layer):
    """y = x W^T + (alpha / rank) x A B, in float64."""
    x, w, a, b = (np.array(v).astype(np.float64) for v in (x, dense_weight, layer.lora_a, layer.lora_b))
    return x @ w.T + layer.scale * (x @ a) @ b


def test_lora_linear_starts_equal_to_base_then_adds_scaled_a_b():
    base = nn.Linear(48, 24, bias=False)
    layer = models.LoRALinear(base, rank=4, alpha=8)
    assert layer.scale == 2.0  # alpha 8 / rank 4
    x = mx.random.normal((3, 48))
    np.testing.assert_array_equal(np.array(layer(x)), np.array(base(x)))  # B = 0
    layer.lora_b = mx.random.normal((4, 24))
    np.testing.assert_allclose(np.array(layer(x)), lora_reference(x, base.weight, layer), atol=1e-4)


def test_lora_linear_over_quantized_base():
    base = nn.QuantizedLinear.from_linear(nn.Linear(64, 32, bias=False), group_size=32, bits=4)
    layer = models.LoRALinear(base, rank=2, alpha=4)
    assert layer.lora_a.shape == (64, 2) and layer.lora_b.shape == (2, 32)
    x = mx.random.normal((2, 64))
    layer.lora_b = mx.random.normal((2, 32))
    dense = mx.dequantize(base.weight, base.scales, base.biases, group_size=32, bits=4)
    np.testing.assert_allclose(np.array(layer(x)), lora_reference(x, dense, layer), atol=1e-4)


@pytest.mark.parametrize("targets, rank", [(("wq", "wv"), 8), (tuple(models.NAMES.parts), 4)])
def test_lora_adds_expected_parameter_count(tiny_llama, targets, rank):
    model, _, config = loading.load_model(tiny_llama[0])
    models.apply_lora(model, models.AdapterConfig(layers=1, targets=targets, rank=rank))
    d, h, kv = config["dim"], config["hidden_dim"], config["n_kv_heads"] * config["head_dim"]
    shapes = {"wq": (d, d), "wk": (d, kv), "wv": (d, kv), "wo": (d, d), "w1": (d, h), "w2": (h, d), "w3": (d, h)}
    expected = sum(rank * (i + o) for t in targets for i, o in [shapes[t]])  # one layer adapted
    assert sum(p.size for _, p in tree_flatten(model.trainable_parameters())) == expected


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="a setting of MLX's CPU backend")
def test_big_freed_buffers_stay_for_reuse_on_the_cpu():
    """MLX's CPU default gives back every freed buffer beyond 32 MiB to the OS (models.py)."""
    mx.clear_cache()
    a = mx.arange(16 * 2**20, dtype=mx.float32)  # 64 MiB
    mx.eval(a)
    del a
    assert mx.get_cache_memory() >= 64 * 2**20


def test_float16_model_generates_from_its_float16_weights(tmp_path):
    """For generation alone (lora.py --prompt), a float16 model keeps its linear weights
    float16 on the CPU: half the memory, half the bytes a decoded token, and the logits
    of the float32 computation, for a prompt and for decoding alike."""
    ckpt = make_checkpoint(tmp_path / "torch", "llama2", seed=2)
    folder = convert_checkpoint(tmp_path / "torch", tmp_path / "mlx", dtype="float16")
    kept, _, _ = loading.load_model(folder, generation_only=True)
    if ops.active():
        assert kept.layers[0].attention.wq.weight.dtype == kept.output.weight.dtype == mx.float16
    assert kept.tok_embeddings.weight.dtype == mx.float32  # so every activation is float32
    # The reference: Meta's forward in float32 over the float16-rounded weights.
    rounded = {k: v.half().float() for k, v in ckpt.state_dict.items()}
    expected = reference_logits(rounded, ckpt.config, TOKENS[:1, :21])
    cache = kept.make_cache()
    prompt = np.array(kept(mx.array(TOKENS[:1, :20]), cache))
    decoded = np.array(kept(mx.array(TOKENS[:1, 20:21]), cache))  # then one decoded token
    np.testing.assert_allclose(np.concatenate([prompt, decoded], axis=1), expected, atol=1e-4, rtol=1e-4)
