"""K-quants (formats/gguf/kquants.py): the codecs against the gguf package's dequantizer, our quantizers'
error, Q6_K held in its own blocks (the kernel and the MLX ops), a tiny K-quant model converted, trained and
fused back in its own types, and hostile files."""

import collections
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

import mlx.core as mx
from gguf_files import write_gguf
from helpers import logits, write_dataset

import convert
import fuse
import loading
import lora
import models
import ops
from formats import gguf as gguf_format
from formats import mlx as mlx_format
from formats.gguf import kquants
from formats.gguf.blocks import kquant_affine, requantized_affine
from utils import UserError

RNG = np.random.default_rng(0)
TOKENS = np.random.default_rng(1).integers(3, 300, size=(2, 16))
# float16 super-scales from the extremes to the ordinary: zero, the smallest subnormal, tiny, huge, negative
EXTREME_D = np.array([0.0, 6e-8, 1e-5, 3e-3, 1.0, 65504.0, -2e-3], np.float16)


def dequantized(blocks, type_name):
    return gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[type_name])


def random_blocks(type_name, n=600):
    """Random bytes with finite super-scales drawn from EXTREME_D and ordinary values."""
    blocks = RNG.integers(0, 256, (n, kquants.TYPE_SIZES[type_name]), dtype=np.uint8)
    where = kquants.HEAD_BYTES[type_name]
    count = (where.stop - where.start) // 2
    d = np.where(RNG.random((n, count)) < 0.3, RNG.choice(EXTREME_D, (n, count)),
                 RNG.uniform(1e-4, 1e-2, (n, count))).astype(np.float16)
    blocks[:, where] = d.view(np.uint8)
    return blocks


def held_values(w, scales, biases, bits):
    return np.array(mx.dequantize(mx.array(w), mx.array(scales), mx.array(biases), group_size=32, bits=bits))


def rows_of(scale, shape=(64, 512)):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


# ----------------------------------------------------------------------------- codecs

@pytest.mark.parametrize("type_name, bits", [("Q4_K", 4), ("Q5_K", 5)])
def test_q4_k_and_q5_k_are_mlx_affine_exactly(type_name, bits):
    """MLX's dequantize of what the reader makes of random superblocks is the gguf package's
    dequantization bit for bit, in float32 (the codes' packing order included)."""
    blocks = random_blocks(type_name)
    w, scales, biases = kquant_affine(blocks.reshape(30, 20, -1), type_name)
    assert w.shape == (30, 20 * 256 * bits // 32) and scales.dtype == biases.dtype == np.float32
    assert np.array_equal(held_values(w, scales, biases, bits), dequantized(blocks, type_name).reshape(30, -1))


@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_K", "Q6_K"])
def test_codes_and_scales_pack_back_to_the_same_bytes(type_name):
    blocks = random_blocks(type_name)
    codes = kquants.unpacked_codes(blocks, type_name)
    body = slice(0, 192) if type_name == "Q6_K" else slice(16, None)
    assert np.array_equal(kquants.packed_codes(codes, type_name), blocks[:, body])
    if type_name == "Q6_K":  # the codes read in value order: d sc (q - 32) is the package's value
        d = np.ascontiguousarray(blocks[:, 208:]).view(np.float16).astype(np.float32)
        sc = np.repeat(blocks[:, 192:208].view(np.int8).astype(np.float32), 16, axis=1)
        assert np.array_equal((d * sc) * (codes.astype(np.float32) - 32), dequantized(blocks, "Q6_K"))
    else:
        assert np.array_equal(kquants.packed_scales(*kquants.unpacked_scales(blocks[:, 4:16])), blocks[:, 4:16])


def test_q6_k_is_held_within_half_an_8_bit_step():
    """Q6_K's exact values in MLX's 8 bits, groups of 32: every value within half the group's 8-bit
    step, which on Gaussian rows' blocks is under half a Q6_K step (measured: at most 0.44, RMS
    0.07; Gemma 3 270M's Q6_K tensors, whose neighbouring scales differ more: 1.6, RMS 0.075)."""
    x = rows_of(1.0, (256, 256)) * RNG.uniform(0.005, 0.05, (256, 1)).astype(np.float32)
    rows = kquants.quantized_superblocks(x, "Q6_K")
    blocks = rows.reshape(-1, 210)
    exact = dequantized(blocks, "Q6_K").reshape(256, 256)
    w, scales, biases = requantized_affine(rows, "Q6_K")
    error = np.abs(held_values(w, scales, biases, 8) - exact)
    assert np.all(error <= np.repeat(scales, 32, axis=1) * (0.5 + 1e-4))  # float32 rounding: 255 codes
    q6_step = np.repeat(np.abs(np.ascontiguousarray(blocks[:, 208:]).view(np.float16).astype(np.float32)
                               * blocks[:, 192:208].view(np.int8)), 16, axis=1).reshape(256, 256)
    assert np.all(error[q6_step > 0] <= 0.5 * q6_step[q6_step > 0])


def kernels_or_mlx_ops(monkeypatch, path):
    """ops' dequantization by the CPU kernel (skipped where unbuilt) or by MLX ops alone."""
    if path == "kernel" and ops.kernels is None:
        pytest.skip("the CPU kernels are not built")
    if path == "mlx ops":
        monkeypatch.setattr(ops, "kernels", None)


@pytest.mark.parametrize("path", ["kernel", "mlx ops"])
def test_q6_k_blocks_dequantize_bit_for_bit(monkeypatch, path):
    """Rows of random Q6_K superblocks, extreme d included, dense: the gguf package's values bit for
    bit (float32), and those rounded to bfloat16 (the bfloat16 products' form)."""
    kernels_or_mlx_ops(monkeypatch, path)
    rows = random_blocks("Q6_K", n=40 * 3).reshape(40, 3 * 210)
    exact = dequantized(rows.reshape(-1, 210), "Q6_K").reshape(40, 768)
    dense = np.array(ops.dequantize_blocks(mx.array(rows), "Q6_K"))
    assert np.array_equal(dense.view(np.uint32), exact.view(np.uint32))
    halved = ops.dequantize_blocks(mx.array(rows), "Q6_K", mx.bfloat16)
    assert np.array_equal(np.array(halved.astype(mx.float32)), np.array(mx.array(exact).astype(mx.bfloat16)
                                                                        .astype(mx.float32)))


def test_the_kernel_refuses_rows_that_are_not_whole_superblocks():
    if ops.kernels is None:
        pytest.skip("the CPU kernels are not built")
    with pytest.raises(ValueError, match="whole Q6_K superblocks"):
        ops.kernels.dequantize_blocks(mx.zeros((4, 300), mx.uint8), "Q6_K")


@pytest.mark.parametrize("path", ["kernel", "mlx ops"])
def test_a_block_linear_is_its_dense_product_and_stays_frozen(monkeypatch, path):
    """BlockQuantizedLinear: x W^T for a decoded row (the kernels: straight from the blocks) and for
    many (the dense weight), its gradient with respect to x W's, and no gradient or trainable
    parameter for its blocks."""
    kernels_or_mlx_ops(monkeypatch, path)
    calls = collections.Counter()
    if path == "kernel":  # counted: a path that silently left the kernels would still match
        kernels = ops.kernels

        class Counting:
            def __getattr__(self, name):
                calls[name] += 1
                return getattr(kernels, name)

        monkeypatch.setattr(ops, "kernels", Counting())
    rows = kquants.quantized_superblocks(rows_of(0.02, (24, 512)), "Q6_K")
    w = dequantized(rows.reshape(-1, 210), "Q6_K").reshape(24, 512)
    layer = models.BlockQuantizedLinear(512, 24, "Q6_K")
    layer.blocks = mx.array(rows)
    layer.unfreeze()
    assert layer.trainable_parameters() == {} and layer.shape == (24, 512)
    for n in (1, 40):
        x = rows_of(1.0, (n, 512))
        assert np.abs(np.array(layer(mx.array(x))) - x @ w.T).max() <= 1e-4
    for n in (1, 40):
        grad = mx.grad(lambda x: layer(x).sum())(mx.array(rows_of(1.0, (n, 512))))
        assert np.abs(np.array(grad) - np.ones((n, 24), np.float32) @ w).max() <= 1e-4
    if path == "kernel":
        # one row twice straight from the blocks; 40 rows: the product, then again in forward and backward
        assert calls["block_matvec"] == 2 and calls["dequantize_blocks"] == 3, calls


@pytest.mark.parametrize("type_name, scales", [("Q3_K", slice(108, 110)), ("Q2_K", slice(80, 84))])
def test_q3_k_and_q2_k_are_held_in_8_bits_too(type_name, scales):
    qtype = gguf.GGMLQuantizationType[type_name]
    rows = RNG.integers(0, 256, (16, 2 * gguf.GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)
    blocks = rows.reshape(32, -1)
    blocks[:, scales] = RNG.uniform(1e-4, 1e-2, (32, (scales.stop - scales.start) // 2)).astype(np.float16).view(np.uint8)
    exact = dequantized(blocks, type_name).reshape(16, 512)
    w, scale, bias = requantized_affine(rows, type_name)
    assert np.all(np.abs(held_values(w, scale, bias, 8) - exact) <= np.repeat(scale, 32, axis=1) * (0.5 + 1e-4))


@pytest.mark.parametrize("type_name, bits", [("Q4_K", 4), ("Q5_K", 5)])
def test_superblocks_come_back_bit_for_bit(type_name, bits):
    """Read into MLX's form and recovered: the same bytes (d, dmin, the 6-bit scales and mins, the
    codes), zero superblocks included; MLX's own quantization is no K-quant's and gives None."""
    x = rows_of(0.02)
    x[3] = 0.0
    blocks = kquants.quantized_superblocks(x, type_name)
    _, scales, biases = kquant_affine(blocks.reshape(64, 2, -1), type_name)
    heads = kquants.superblock_heads(scales, biases, type_name)
    codes = kquants.unpacked_codes(blocks.reshape(-1, kquants.TYPE_SIZES[type_name]), type_name)
    assert np.array_equal(kquants.superblocks(heads.reshape(-1, 16), codes, type_name), blocks.reshape(128, -1))
    _, mlx_scales, mlx_biases = mx.quantize(mx.array(x), group_size=32, bits=bits)
    assert kquants.superblock_heads(np.array(mlx_scales), np.array(mlx_biases), type_name) is None


def sub_block_steps(blocks, type_name):
    """Each value's step: d sc_j (Q4_K, Q5_K) or d |sc_j| (Q6_K)."""
    if type_name == "Q6_K":
        d = np.ascontiguousarray(blocks[:, 208:]).view(np.float16).astype(np.float32)
        return np.repeat(np.abs(d * blocks[:, 192:208].view(np.int8)), 16, axis=1)
    d = np.ascontiguousarray(blocks[:, :2]).view(np.float16).astype(np.float32)
    return np.repeat(d * kquants.unpacked_scales(blocks[:, 4:16])[0], 32, axis=1)


@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_K", "Q6_K"])
@pytest.mark.parametrize("scale", [0.02, 3000.0])
def test_quantizers_error_is_a_rounding_quantizers(type_name, scale):
    """llama.cpp's searches: RMS error at most a uniform rounding's (step / sqrt 12); the least-squares
    fits may clip a sub-block's outlier, by at most a step and a half (Q6_K: one)."""
    x = rows_of(scale)
    blocks = kquants.quantized_superblocks(x, type_name).reshape(-1, kquants.TYPE_SIZES[type_name])
    error = np.abs(dequantized(blocks, type_name) - x.reshape(-1, 256))
    step = sub_block_steps(blocks, type_name)
    assert np.sqrt(np.mean(np.square(error / step))) <= 1 / np.sqrt(12)
    assert np.all(error <= (1.0 if type_name == "Q6_K" else 1.5) * step)


@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_K", "Q6_K"])
def test_quantizers_on_extreme_rows(type_name):
    rows = np.stack([np.zeros(256), np.full(256, 0.75), np.full(256, -3.0),
                     np.linspace(-60000, 65504, 256), RNG.standard_normal(256) * 1e-7]).astype(np.float32)
    blocks = kquants.quantized_superblocks(rows, type_name)
    assert gguf_format.blocks.finite_values(blocks, type_name)
    back = dequantized(blocks, type_name)
    assert np.array_equal(back[0], rows[0])  # zeros stay zeros
    assert np.abs(back[1:3] - rows[1:3]).max() <= 0.02 * 3.0  # a constant row, within a step of its 6-bit scale
    assert np.abs(back[3] - rows[3]).max() <= 65504 / 15 * 1.5  # finite, about a 4-bit step at float16's top
    assert np.all(np.abs(back[4] - rows[4]) <= np.abs(rows[4]))  # below float16's range: never worse than zero


# ----------------------------------------------------------------------------- a tiny K-quant model

def kquant_file(folder, name, types):
    """A tiny llama GGUF whose matrices our writer quantized: {GGUF-free name fragment: type}."""
    floats = write_gguf(str(folder / f"{name}-f32.gguf"), "F32", dim=256, hidden_dim=512, weight_std=0.3)
    checkpoint = gguf_format.Checkpoint(floats.path)
    chosen = {key: next((t for part, t in types.items() if part in key), "F32") if len(shape) == 2 else "F32"
              for key, shape in checkpoint.shapes.items()}
    path = str(folder / f"{name}.gguf")
    gguf_format.write(checkpoint, path, chosen)
    return path


EXACT_TYPES = {"attention.wo": "Q5_K", "w2": "Q5_K", "": "Q4_K"}
# Q6_K on the output layer and every block's wv: kept in their own blocks
MIXED_TYPES = {"output": "Q6_K", "attention.wv": "Q6_K", "attention.wo": "Q5_K", "w2": "Q5_K", "": "Q4_K"}
Q6_K_LINEARS = ("output", "layers.0.attention.wv", "layers.1.attention.wv")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("kquants")
    return root, kquant_file(root, "exact", EXACT_TYPES), kquant_file(root, "mixed", MIXED_TYPES)


def tensors(path):
    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(path).tensors}


def test_convert_keeps_q4_k_and_q5_k_exactly(files, capfd):
    """The folder's logits are the float reading's of the same file within 1e-5; convert.py says
    what each type became, and config.json records every kept weight's type."""
    root, exact, _ = files
    config = convert.convert(exact, str(root / "q"))
    said = capfd.readouterr().err
    assert "note: 12 Q4_K weights: 4-bit groups of 32 (exact)" in said
    assert "note: 4 Q5_K weights: 5-bit groups of 32 (exact)" in said
    assert config["quantization"]["bits"] == 4 and config["quantization"]["layers.0.attention.wo"]["bits"] == 5
    recorded = json.loads((root / "q" / "config.json").read_text())[mlx_format.GGUF_TYPES]
    assert recorded["layers.1.feed_forward.w2.weight"] == "Q5_K" and recorded["output.weight"] == "Q4_K"
    assert mlx_format.Checkpoint(str(root / "q")).quantized_scales_dtype("output.weight") == mx.float32
    convert.convert(exact, str(root / "f"), dtype="float32")
    quantized, floats = (logits(loading.load_model(str(root / f))[0], TOKENS) for f in ("q", "f"))
    assert np.abs(quantized - floats).max() <= 1e-5 * max(1.0, np.abs(floats).max())


@pytest.fixture(scope="module")
def mixed_folder(files):
    """The mixed file converted as it is: Q4_K and Q5_K in MLX's groups, Q6_K in its blocks."""
    root, _, mixed = files
    convert.convert(mixed, str(root / "mixed"))
    return str(root / "mixed")


def test_convert_keeps_q6_k_linears_in_their_blocks(files, mixed_folder, monkeypatch):
    """Each Q6_K linear's blocks are the file's bytes, named in config.json's quantization block
    (and nowhere else); the model holds them in BlockQuantizedLinears, counted as their values, and
    computes the float reading's logits with the kernels and without."""
    root, _, mixed = files
    config = json.loads(Path(mixed_folder, "config.json").read_text())
    assert all(config["quantization"][path] == {"gguf_type": "Q6_K"} for path in Q6_K_LINEARS)
    assert not any(key.removesuffix(".weight") in Q6_K_LINEARS for key in config[mlx_format.GGUF_TYPES])
    original = tensors(mixed)
    held = mx.load(str(Path(mixed_folder, "weights.npz")))
    for path, gguf_name in zip(Q6_K_LINEARS, ("output.weight", "blk.0.attn_v.weight", "blk.1.attn_v.weight")):
        assert held[f"{path}.blocks"].dtype == mx.uint8 and np.array(held[f"{path}.blocks"]).tobytes() == \
            original[gguf_name][1]
    model = loading.load_model(mixed_folder)[0]
    assert isinstance(model.output, models.BlockQuantizedLinear)
    convert.convert(mixed, str(root / "mixed-f32"), dtype="float32")
    floats_model = loading.load_model(str(root / "mixed-f32"))[0]
    assert models.count_parameters(model)[0] == models.count_parameters(floats_model)[0]
    floats = logits(floats_model, TOKENS)
    assert np.abs(logits(model, TOKENS) - floats).max() <= 1e-5 * max(1.0, np.abs(floats).max())
    monkeypatch.setattr(ops, "kernels", None)  # as MLX_LORA_CPU_KERNELS=0 (and every GPU) computes
    assert np.abs(logits(loading.load_model(mixed_folder)[0], TOKENS) - floats).max() <= \
        1e-5 * max(1.0, np.abs(floats).max())


@pytest.mark.parametrize("entry, message", [
    ({"gguf_type": "Q9_K"}, "'quantization.output' must be {\"gguf_type\": one of Q6_K}"),
    ({"gguf_type": "Q6_K", "bits": 8}, "'quantization.output' must be {\"gguf_type\": one of Q6_K}"),
])
def test_a_malformed_blocks_entry_is_one_line(mixed_folder, tmp_path, entry, message):
    folder = tmp_path / "copy"
    shutil.copytree(mixed_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization"]["output"] = entry
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as caught:
        loading.load_model(str(folder))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_transformers_reads_our_k_quant_file_as_the_toolkit_does(files, mixed_folder):
    """Our Q4_K/Q5_K/Q6_K blocks read by transformers' GGUF loader (the gguf package dequantizes):
    the logits of the toolkit's model converted from the same file, kept quantized."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    _, _, mixed = files
    ours = logits(loading.load_model(mixed_folder)[0], TOKENS)
    model = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(mixed), gguf_file=os.path.basename(mixed),
                                                              dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(torch.as_tensor(TOKENS)).logits.numpy()
    assert np.abs(ours - theirs).max() <= 1e-4 * max(1.0, np.abs(theirs).max())


def trained_adapters(folder, tmp_path, targets, *flags):
    """Adapters trained on the converted mixed file, and their training losses."""
    data = write_dataset(tmp_path / "data", n_train=8, n_valid=4, n_test=4)
    adapters = str(tmp_path / "a.npz")
    lora.main(["--model", folder, "--train", "--data", data, "--adapter-file", adapters, "--iters", "8",
               "--batch-size", "2", "--learning-rate", "1e-2", "--lora-layers", "1", "--lora-targets", targets,
               "--steps-per-report", "1", "--steps-per-eval", "8", "--val-batches", "1", *flags])
    losses = [json.loads(line).get("train_loss") for line in (tmp_path / "a.metrics.jsonl").read_text().splitlines()]
    return adapters, [x for x in losses if x is not None]


def test_qlora_trains_and_fuse_writes_the_original_types(files, mixed_folder, tmp_path):
    """QLoRA on the converted mixed file (Q4_K, Q5_K, Q6_K; a Q6_K linear adapted, others not): the
    loss falls. Then fuse.py --format gguf: every tensor in its original type, the untouched ones
    the original bytes (Q6_K's too), the adapted ones not."""
    _, _, mixed = files
    adapters, losses = trained_adapters(mixed_folder, tmp_path, "wq,wv,w2")
    assert all(np.isfinite(losses)) and np.mean(losses[-2:]) < np.mean(losses[:2])
    out = str(tmp_path / "fused.gguf")
    fuse.main(["--model", mixed_folder, "--adapter-file", adapters, "--save-path", out, "--format", "gguf"])
    original, written = tensors(mixed), tensors(out)
    assert {n: t for n, (t, _) in written.items()} == {n: t for n, (t, _) in original.items()}
    adapted = {"blk.1.attn_q.weight", "blk.1.attn_v.weight", "blk.1.ffn_down.weight"}
    for name, (type_name, data) in original.items():
        if type_name in ("Q4_K", "Q5_K", "Q6_K"):
            assert (written[name][1] == data) == (name not in adapted), name
    assert written["output.weight"][0] == written["blk.1.attn_v.weight"][0] == "Q6_K"


def test_dora_over_q6_k_blocks_fuses_into_a_folder_that_keeps_them(mixed_folder, tmp_path):
    """DoRA on a Q6_K linear (its magnitudes from the exact dense weight), fused into an MLX folder
    (the fuse check passes): untouched Q6_K linears stay the same blocks, the adapted one is Q6_K
    blocks again."""
    adapters, losses = trained_adapters(mixed_folder, tmp_path, "wv", "--fine-tune-type", "dora")
    assert all(np.isfinite(losses))
    out = str(tmp_path / "fused")
    fuse.main(["--model", mixed_folder, "--adapter-file", adapters, "--save-path", out])
    base, fused = mx.load(str(Path(mixed_folder, "weights.npz"))), mx.load(str(Path(out, "weights.npz")))
    assert json.loads(Path(out, "config.json").read_text())["quantization"]["layers.1.attention.wv"] == \
        {"gguf_type": "Q6_K"}
    for path in Q6_K_LINEARS:
        same = np.array_equal(np.array(base[f"{path}.blocks"]), np.array(fused[f"{path}.blocks"]))
        assert same == (path != "layers.1.attention.wv"), path


@pytest.mark.parametrize("tensor_type", ["Q5_0", "Q5_1"])
def test_q5_0_and_q5_1_come_back_with_the_same_bytes(tmp_path, tensor_type):
    """Llama.cpp's Q4_K_M falls back to Q5_0 where rows are not whole superblocks: such a file
    converted and written back keeps every tensor's type and bytes too."""
    original = write_gguf(str(tmp_path / "original.gguf"), tensor_type).path
    convert.convert(original, str(tmp_path / "mlx"))
    checkpoint = mlx_format.Checkpoint(str(tmp_path / "mlx"))
    path = str(tmp_path / "back.gguf")
    gguf_format.write(checkpoint, path, gguf_format.tensor_types(checkpoint))
    assert tensors(path) == tensors(original)


def test_iq_types_are_dequantized_and_said_so(tmp_path, monkeypatch, capfd):
    import gguf_files

    monkeypatch.setitem(gguf_files.K_QUANT_SCALES, "IQ4_NL", slice(0, 2))  # random blocks, finite d
    path = write_gguf(str(tmp_path / "iq.gguf"), "IQ4_NL").path
    checkpoint = gguf_format.Checkpoint(path)
    assert checkpoint.held_as("layers.0.attention.wq.weight") == "float32"
    assert checkpoint.held_as("norm.weight") == "float32" and checkpoint.gguf_type("norm.weight") == "F32"
    convert.convert(path, str(tmp_path / "mlx"))
    assert "note: 16 IQ4_NL weights: float16 (dequantized)" in capfd.readouterr().err
    assert mlx_format.GGUF_TYPES not in json.loads((tmp_path / "mlx" / "config.json").read_text())


# ----------------------------------------------------------------------------- hostile files

def info_offset(raw, name):
    """Where a tensor's info (n_dims, dims, type, offset) starts in the header."""
    key = struct.pack("<Q", len(name)) + name.encode()
    return raw.index(key) + len(key)


def forged(files, tmp_path, edit):
    """The exact file with `edit(raw bytearray, checkpoint)` applied, written beside."""
    raw = bytearray(Path(files[1]).read_bytes())
    edit(raw, gguf_format.Checkpoint(files[1]))
    path = tmp_path / "forged.gguf"
    path.write_bytes(bytes(raw))
    return str(path)


def set_row_length(raw, _):
    at = info_offset(raw, "blk.0.attn_q.weight")
    struct.pack_into("<Q", raw, at + 4, 128)


def truncate(raw, _):
    del raw[-100:]


def first_superblock(field, value):
    def edit(raw, checkpoint):
        entry = checkpoint._entries["layers.0.attention.wq.weight"]
        raw[entry.start + field:entry.start + field + 2] = np.float16(value).tobytes()
    return edit


def unknown_type(raw, _):
    at = info_offset(raw, "blk.0.attn_q.weight")
    (n_dims,) = struct.unpack_from("<I", raw, at)
    struct.pack_into("<I", raw, at + 4 + 8 * n_dims, 99)


@pytest.mark.parametrize("edit, message", [
    (set_row_length, "rows of 128 values are not whole Q4_K blocks of 256"),
    (truncate, "runs past the end of the file (truncated?)"),
    (first_superblock(0, np.inf), "blk.0.attn_q.weight has blocks whose scale is NaN or infinite"),
    (first_superblock(2, np.nan), "blk.0.attn_q.weight has blocks whose scale is NaN or infinite"),
    (unknown_type, "tensor type 99 (blk.0.attn_q.weight) is not supported"),
])
def test_hostile_k_quant_files_are_one_line_errors(files, tmp_path, edit, message):
    path = forged(files, tmp_path, edit)
    with pytest.raises(UserError) as caught:
        convert.convert(path, str(tmp_path / "out"))
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert not os.path.exists(tmp_path / "out")


def test_a_malformed_gguf_types_record_is_one_line(files, tmp_path):
    _, exact, _ = files
    convert.convert(exact, str(tmp_path / "q"))
    config_path = tmp_path / "q" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(dict(config, **{mlx_format.GGUF_TYPES: ["Q4_K"]})))
    with pytest.raises(UserError, match="'gguf_types' must map weight names to ggml type names") as caught:
        mlx_format.Checkpoint(str(tmp_path / "q"))
    assert "\n" not in str(caught.value)
