"""formats/gguf/: GGUF files read into this toolkit's names, config, weights and tokenizer.

The files are written by llama.cpp's own writer (tests/gguf_files.py); the references are the
gguf package's dequantization, the writer's own inputs, transformers' GGUF tokenizer and the
SentencePiece model a vocabulary came from.
"""

import os
import struct
import time
import tracemalloc

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")
spm = pytest.importorskip("sentencepiece")

import mlx.core as mx  # noqa: E402  (conftest imported utils first)
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import convert  # noqa: E402
from formats import gguf as gguf_format  # noqa: E402
from gguf_files import weight_shapes, write_gguf  # noqa: E402
from utils import UserError  # noqa: E402
from helpers import CHATML, hf_llama3_factors  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLOAT_TYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
MLX_BITS = {"Q8_0": 8, "Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5}
# Text a tokenizer must get right: accents, emoji, CJK, runs of spaces and tabs, newlines,
# special and added tokens written in text.
TEXTS = ["Hello world!", "Café déjà vu, naïve façade — Ærøskøbing, Straße", "日本語のテキスト、中文字符 한국어 문장",
         "emoji 🙂👍🏽 and 🇫🇷 flags", "  multiple   spaces\t\ttabs \t mixed", "\n\nnewlines\r\n end  \n",
         "<|im_start|>user\nWhat is MLX?<|im_end|>\n<|im_start|>assistant\n", "I <think>deeply</think> so",
         "don't you're I'LL we've", "x = f(y) + {a: [b]}; // code", "Ελληνικά Русский عربي עברית हिन्दी", " ", ""]
DIGITS = ["12345", "3.14159 and 2024-01-01", "1000000 apples"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


_WRITTEN = {}


def written(folder, tensor_type="F32", vocab="gpt2", **options):
    """write_gguf's file for these arguments, written once per module."""
    key = (tensor_type, vocab, tuple(sorted(options.items())))
    if key not in _WRITTEN:
        name = "-".join([tensor_type, vocab] + [f"{k}{v}" for k, v in sorted(options.items())]) + ".gguf"
        _WRITTEN[key] = write_gguf(str(folder / name), tensor_type, vocab, **options)
    return _WRITTEN[key]


def reference(stored):
    """The gguf package's float32 values of a tensor as written."""
    _, data, qtype = stored
    return gguf.quants.dequantize(data.view(np.uint8) if qtype.name not in ("F32", "F16") else data, qtype)


def refuses(path, *fragments):
    """Checkpoint(path) raises one UserError line that names the file and says `fragments`."""
    with pytest.raises(UserError) as caught:
        gguf_format.Checkpoint(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ----------------------------------------------------------------------------- weights and config

@pytest.mark.parametrize("tensor_type", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_config_shapes_and_weights(folder, tensor_type):
    w = written(folder, tensor_type, vocab="llama" if tensor_type in ("F16", "Q4_0") else "gpt2")
    ckpt = gguf_format.Checkpoint(w.path)
    assert ckpt.config == w.config
    assert ckpt.shapes == weight_shapes(64, 2, 4, 2, 128, w.config["vocab_size"], tied=False)
    for name, shape in ckpt.shapes.items():
        ref = reference(w.stored[name])
        got = ckpt.tensor(name)
        assert got.shape == shape
        if len(shape) == 1 or tensor_type in FLOAT_TYPES:  # as stored, nothing converted
            dtype = "float32" if len(shape) == 1 else FLOAT_TYPES[tensor_type]
            assert ckpt.stored_dtype(name) == dtype and got.dtype == getattr(mx, dtype)
            assert ckpt.quantization(name) is None
            assert np.array_equal(np.array(got.astype(mx.float32)), ref)
            if tensor_type == "F32" or len(shape) == 1:
                np.testing.assert_array_equal(np.array(got), w.weights[name])
            continue
        bits = MLX_BITS[tensor_type]
        assert ckpt.stored_dtype(name) is None and ckpt.quantization(name) == (32, bits)
        weight, scales, biases = ckpt.quantized(name)
        assert weight.dtype == mx.uint32 and weight.shape == (shape[0], shape[1] * bits // 32)
        assert scales.dtype == biases.dtype == ckpt.quantized_scales_dtype(name) == mx.float16
        assert scales.shape == biases.shape == (shape[0], shape[1] // 32)
        # Every value exact in float32 (only a zero's sign may differ: d q + b rounds -0 to +0).
        dequantized = mx.dequantize(weight, scales.astype(mx.float32), biases.astype(mx.float32),
                                    group_size=32, bits=bits)
        assert np.array_equal(np.array(dequantized), ref)
        assert got.dtype == mx.float32 and np.array_equal(np.array(got), ref)
        assert np.abs(ref - w.weights[name]).max() < 0.05  # and the quantization is of the weights


@pytest.mark.parametrize("tensor_type, bits", [("Q6_K", 8), ("Q4_K", 4)])
def test_k_quants_are_held_quantized_and_read_exactly(folder, tensor_type, bits):
    """Q4_K in MLX's 4 bits exactly, Q6_K re-quantized to 8 (tests/test_kquants.py); tensor() exact."""
    w = written(folder, tensor_type, dim=256, hidden_dim=256)
    ckpt = gguf_format.Checkpoint(w.path)
    assert ckpt.config == dict(w.config, dim=256, hidden_dim=256, head_dim=64)
    for name in ("tok_embeddings.weight", "layers.1.feed_forward.w2.weight"):
        assert ckpt.stored_dtype(name) is None and ckpt.quantization(name) == (32, bits)
        got = ckpt.tensor(name)
        assert got.dtype == mx.float32 and got.shape == ckpt.shapes[name]
        assert np.array_equal(np.array(got), reference(w.stored[name]))


def test_large_q8_scales_come_as_float32(tmp_path):
    """-128 d overflows float16 past d = 511.75: then scales and biases are float32, still exact."""
    path = str(tmp_path / "large.gguf")
    write_gguf(path, "Q8_0")
    raw = bytearray(open(path, "rb").read())
    ckpt = gguf_format.Checkpoint(path)
    entry = ckpt._entries["layers.0.attention.wq.weight"]
    raw[entry.start:entry.start + 2] = np.float16(600.0).tobytes()  # the first block's d
    open(path, "wb").write(raw)
    ckpt = gguf_format.Checkpoint(path)
    weight, scales, biases = ckpt.quantized("layers.0.attention.wq.weight")
    assert scales.dtype == biases.dtype == ckpt.quantized_scales_dtype("layers.0.attention.wq.weight") == mx.float32
    assert scales[0, 0].item() == 600.0
    blocks = np.frombuffer(raw, np.uint8, entry.nbytes, entry.start).reshape(64, -1)
    ref = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(np.array(mx.dequantize(weight, scales, biases, group_size=32, bits=8)), ref)
    assert ckpt.quantized("layers.0.attention.wk.weight")[1].dtype == mx.float16


def test_tied_embeddings_have_no_output(folder):
    w = written(folder, "BF16", tied=True)
    ckpt = gguf_format.Checkpoint(w.path)
    assert ckpt.config["tie_word_embeddings"] is True and "output.weight" not in ckpt.shapes


def test_opening_reads_no_tensor_data(tmp_path):
    """The file is mapped: opening it allocates a small part of its size."""
    w = write_gguf(str(tmp_path / "big.gguf"), "F32", dim=256, hidden_dim=512, n_layers=4, n_heads=4,
                   n_kv_heads=4)
    tracemalloc.start()
    try:
        gguf_format.Checkpoint(w.path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert os.path.getsize(w.path) > 10e6 and peak < 2e6


def test_linear_rope_scaling_and_end_tokens(tmp_path):
    metadata = {"llama.rope.scaling.type": ("linear", gguf.GGUFValueType.STRING),
                "llama.rope.scaling.factor": (4.0, gguf.GGUFValueType.FLOAT32),
                "tokenizer.ggml.eom_token_id": (3, gguf.GGUFValueType.UINT32)}
    w = write_gguf(str(tmp_path / "linear.gguf"), metadata=metadata)
    config = gguf_format.Checkpoint(w.path).config
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    assert config["eos_token_ids"] == [2, 0, 3] and config["bos_token_id"] == 1


@pytest.mark.parametrize("factor, low, high, old", [(8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192),
                                                    (16.0, 0.5, 4.0, 8192), (8.0, 1.0, 2.0, 8192)])
def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path, factor, low, high, old):
    """Any parameters the config gives reproduce the file's rope_freqs (an equivalent blend may
    come back for parameters other than Llama 3's)."""
    theta, head_dim = 500000.0, 64
    factors = hf_llama3_factors(theta, head_dim, factor, low, high, old)
    w = write_gguf(str(tmp_path / "llama3.gguf"), dim=128, n_heads=2, n_kv_heads=1, rope_theta=theta,
                   rope_freqs=factors)
    scaling = gguf_format.Checkpoint(w.path).config["rope_scaling"]
    assert scaling["rope_type"] == "llama3" and scaling["factor"] == factor
    again = hf_llama3_factors(theta, head_dim, scaling["factor"], scaling["low_freq_factor"],
                              scaling["high_freq_factor"], scaling["original_max_position_embeddings"])
    np.testing.assert_allclose(again, factors, rtol=1e-5)
    if (low, high, old) == (1.0, 4.0, 8192):
        assert scaling == {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def test_other_rope_freqs_are_refused(tmp_path):
    path = str(tmp_path / "odd.gguf")
    write_gguf(path, dim=128, n_heads=2, n_kv_heads=1, rope_freqs=np.linspace(1, 3, 32))
    refuses(path, "rope_freqs.weight does not follow Llama 3's RoPE scaling")


def test_detect(folder, tmp_path):
    w = written(folder)
    renamed = tmp_path / "model.bin"
    renamed.write_bytes(open(w.path, "rb").read(4096))
    other = tmp_path / "other.gguf"
    other.write_bytes(b"PK\x03\x04")
    assert gguf_format.detect(w.path) and gguf_format.detect(str(renamed))
    assert not gguf_format.detect(str(other)) and not gguf_format.detect(str(tmp_path))
    assert not gguf_format.detect(str(tmp_path / "missing.gguf"))


# ----------------------------------------------------------------------------- tokenizers

def written_tokenizer(folder, w, name):
    out = folder / name
    out.mkdir(exist_ok=True)
    gguf_format.Checkpoint(w.path).write_tokenizer(str(out))
    return out


@pytest.mark.parametrize("pre", ["llama-bpe", "smollm"])
def test_byte_level_tokenizer_encodes_as_transformers(folder, pre):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from tokenizers import Tokenizer

    w = written(folder, "Q8_0", pre=pre)
    out = written_tokenizer(folder, w, f"tokenizer-{pre}")
    assert sorted(os.listdir(out)) == ["chat_template.jinja", "tokenizer.json"]
    assert (out / "chat_template.jinja").read_text(encoding="utf-8") == CHATML
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=os.path.basename(w.path))
    # transformers splits smollm's digits as GPT-2 does; llama.cpp splits them one by one
    texts = TEXTS + (DIGITS if pre == "llama-bpe" else [])
    for text in texts:
        ids = ours.encode(text, add_special_tokens=False).ids
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.encode("<|im_start|>", add_special_tokens=False).ids == [1]
    assert ours.encode("<think>", add_special_tokens=False).ids == [3]
    assert ours.get_vocab_size() == w.config["vocab_size"]


@pytest.mark.parametrize("pre, pieces", [("smollm", ["1", "2", "3", "4", "5"]), ("llama-bpe", ["123", "45"]),
                                         ("default", ["123", "45"])])
def test_digits_split_as_llama_cpp_does(folder, pre, pieces):
    from tokenizers import Tokenizer

    out = written_tokenizer(folder, written(folder, "Q4_1", pre=pre), f"digits-{pre}")
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert [piece for piece, _ in tokenizer.pre_tokenizer.pre_tokenize_str("12345")] == pieces
    assert "".join(tokenizer.encode("12345", add_special_tokens=False).tokens) == "12345"


def test_add_bos_token_defaults(folder):
    assert gguf_format.Checkpoint(written(folder, "Q4_1", pre="smollm").path).config["add_bos_token"] is False
    assert gguf_format.Checkpoint(written(folder, "Q8_0", pre="llama-bpe").path).config["add_bos_token"] is True
    assert gguf_format.Checkpoint(written(folder, "F16", "llama").path).config["add_bos_token"] is True


def test_sentencepiece_tokenizer_encodes_as_its_model(folder):
    w = written(folder, "F16", "llama")
    out = written_tokenizer(folder, w, "tokenizer-llama")
    assert sorted(os.listdir(out)) == ["chat_template.jinja", "tokenizer.model"]
    ours = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    original = spm.SentencePieceProcessor(model_file=w.tokenizer)
    assert ours.vocab_size() == original.vocab_size() == w.config["vocab_size"]
    assert (ours.bos_id(), ours.eos_id(), ours.unk_id()) == (original.bos_id(), original.eos_id(), original.unk_id())
    for text in TEXTS + DIGITS:
        ids = ours.encode(text)
        assert ids == original.encode(text), text
        assert ours.decode(ids) == original.decode(ids)
    assert [ours.is_byte(i) for i in range(ours.vocab_size())] == \
           [original.is_byte(i) for i in range(original.vocab_size())]


def test_mistral_vocabulary_encodes_as_mistral(tmp_path):
    """Mistral 7B's real 32000-piece vocabulary, through a GGUF and back: the same ids."""
    original = os.path.join(ROOT, "..", "shared", "assets", "tokenizers", "mistral-7b-v0.1.model")
    if not os.path.exists(original):
        pytest.skip("../shared/assets/tokenizers/mistral-7b-v0.1.model is not available")
    w = write_gguf(str(tmp_path / "mistral.gguf"), "Q8_0", "llama", spm_model=original)
    gguf_format.Checkpoint(w.path).write_tokenizer(str(tmp_path))
    ours = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    theirs = spm.SentencePieceProcessor(model_file=original)
    for text in TEXTS + DIGITS + ["a    b", "\t\ttab", "x\n\n\ny", "   leading"]:
        assert ours.encode(text) == theirs.encode(text), text


# ----------------------------------------------------------------------------- bad files

def after(data, marker, skip=0):
    """The offset `skip` bytes past `marker`, a key or tensor name found once in the file."""
    at = data.find(marker)
    assert at >= 0 and data.find(marker, at + 1) < 0, marker
    return at + len(marker) + skip


def patched(marker, skip, new):
    def patch(data):
        at = after(data, marker, skip)
        return data[:at] + new + data[at + len(new):]
    return patch


def cut(marker, skip):
    return lambda data: data[:after(data, marker, skip)]


Q = struct.Struct("<Q").pack
I = struct.Struct("<I").pack  # noqa: E741
# (id, how the good F32 file is spoiled, what the message says). Tensor infos are the name, then
# n_dims (+0), ne0 (+4), ne1 (+12), type (+20), offset (+24); metadata the key, then its type (+0).
BAD_BYTES = [
    ("magic", lambda data: b"GGUG" + data[4:], "not a GGUF file (magic b'GGUG')"),
    ("version 1", lambda data: data[:4] + I(1) + data[8:], "GGUF version 1 is not supported (2 or 3)"),
    ("version 7", lambda data: data[:4] + I(7) + data[8:], "GGUF version 7 is not supported (2 or 3)"),
    ("truncated header", cut(b"blk.1.ffn_up.weight", 6),
     "blk.1.ffn_up.weight runs past the end of the file (truncated?)"),
    ("truncated data", lambda data: data[:-100], "its data runs past the end of the file (truncated?)"),
    ("terabyte string", patched(b"general.architecture", 4, Q(2**40)),
     "general.architecture: string length 1099511627776 does not fit in a file of"),
    ("terabyte array", patched(b"tokenizer.ggml.tokens", 8, Q(2**40)),
     "tokenizer.ggml.tokens: array count 1099511627776 does not fit in a file of"),
    ("tensor count", lambda data: data[:8] + Q(2**64 - 1) + data[16:],
     "tensor count 18446744073709551615 does not fit in a file of"),
    ("n_dims 9", patched(b"blk.0.attn_q.weight", 0, I(9)),
     "blk.0.attn_q.weight has 9 dimensions (GGUF allows 1 to 4)"),
    ("offset past the end", patched(b"blk.1.ffn_up.weight", 24, Q(2**50)),
     "blk.1.ffn_up.weight: its data runs past the end of the file (truncated?)"),
    ("aliased offset", patched(b"blk.1.ffn_up.weight", 24, Q(0)), "overlaps the bytes of"),
    ("type Q8_1", patched(b"blk.0.attn_q.weight", 20, I(9)),
     "tensor type Q8_1 (blk.0.attn_q.weight) is not supported"),
    ("type 99", patched(b"blk.0.attn_q.weight", 20, I(99)), "tensor type 99 (blk.0.attn_q.weight) is not supported"),
    ("bloom", patched(b"general.architecture", 12, b"bloom"),
     "architecture 'bloom' is not supported (supported: llama, qwen2, qwen3, "),
    ("wrong shape", patched(b"blk.0.attn_q.weight", 12, Q(32)),
     "blk.0.attn_q.weight (layers.0.attention.wq.weight) has shape (32, 64), expected (64, 64)"),
    ("duplicate tensor", patched(b"blk.1.ffn_up.weight", -15, b"0"), "tensor blk.0.ffn_up.weight appears twice"),
    ("partial rotary", patched(b"llama.rope.dimension_count", 4, I(8)),
     "llama.rope.dimension_count 8 differs from the head size 16"),
    ("kv heads", patched(b"llama.attention.head_count_kv", 4, I(3)), "head_count 4 is not a multiple of"),
    ("epsilon", patched(b"llama.attention.layer_norm_rms_epsilon", 4, struct.pack("<f", float("nan"))),
     "layer_norm_rms_epsilon must be a positive finite number, got nan"),
    ("tokenizer model", patched(b"tokenizer.ggml.model", 12, b"bert"),
     "tokenizer model 'bert' is not supported (supported: gpt2, llama)"),
    ("bos id", patched(b"tokenizer.ggml.bos_token_id", 4, I(10**6)),
     "tokenizer.ggml.bos_token_id must be a token id"),
]


@pytest.mark.parametrize("spoil, says", [case[1:] for case in BAD_BYTES], ids=[case[0] for case in BAD_BYTES])
def test_bad_bytes_are_one_line_errors(folder, tmp_path, spoil, says):
    good = open(written(folder).path, "rb").read()
    path = str(tmp_path / "model.gguf")
    with open(path, "wb") as f:
        f.write(spoil(good))
    refuses(path, says)


BAD_FILES = [
    ("missing tensor", dict(drop=("blk.1.ffn_up.weight",)),
     "tensor blk.1.ffn_up.weight (layers.1.feed_forward.w3.weight) is missing"),
    ("unknown pre", dict(pre="mystery"), "tokenizer.ggml.pre 'mystery' is not supported (supported: "),
    ("experts", dict(metadata={"llama.expert_count": (8, gguf.GGUFValueType.UINT32)}), "mixture-of-experts"),
    ("alignment", dict(metadata={"general.alignment": (48, gguf.GGUFValueType.UINT32)}),
     "general.alignment must be a power of two, got 48"),
    ("yarn", dict(metadata={"llama.rope.scaling.type": ("yarn", gguf.GGUFValueType.STRING)}),
     "RoPE scaling 'yarn' is not supported"),
]


@pytest.mark.parametrize("options, says", [case[1:] for case in BAD_FILES], ids=[case[0] for case in BAD_FILES])
def test_bad_files_are_one_line_errors(tmp_path, options, says):
    path = str(tmp_path / "model.gguf")
    write_gguf(path, **options)
    refuses(path, says)


@pytest.mark.parametrize("tensor_type", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_a_block_with_a_nan_scale_is_refused_not_kept(tmp_path, tensor_type):
    path = str(tmp_path / "model.gguf")
    write_gguf(path, tensor_type=tensor_type)
    entry = gguf_format.Checkpoint(path)._entries["layers.1.feed_forward.w3.weight"]
    data = bytearray(open(path, "rb").read())
    data[entry.start + 5 * entry.type_size:entry.start + 5 * entry.type_size + 2] = b"\x00\x7e"  # float16 NaN
    open(path, "wb").write(bytes(data))
    with pytest.raises(UserError, match="blk.1.ffn_up.weight has blocks whose scale is NaN or infinite"):
        convert.convert(path, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_counts_past_any_real_file_are_refused(tmp_path):
    """70,000 tensor infos would fit in the file, but their Python objects would outgrow it."""
    path = tmp_path / "many.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 70000, 0) + bytes(70000 * 32))
    refuses(str(path), "tensor count 70000 is more than this reader accepts (65536)")


def test_missing_and_empty_files(tmp_path):
    refuses(str(tmp_path / "absent.gguf"), "not found")
    (tmp_path / "empty.gguf").write_bytes(b"")
    refuses(str(tmp_path / "empty.gguf"), "not a GGUF file")


# ----------------------------------------------------------------------------- hostile bytes

def open_or_refuse(path, out):
    """A Checkpoint whose weights and tokenizer all come out, or one UserError line; never another
    exception, never much more memory than the file's size, never slowly."""
    start = time.perf_counter()
    tracemalloc.start()
    try:
        ckpt = gguf_format.Checkpoint(path)
        for name in ckpt.shapes:
            ckpt.tensor(name)
            if ckpt.quantization(name):
                assert ckpt.quantized(name)[1].dtype == ckpt.quantized_scales_dtype(name)
        ckpt.write_tokenizer(out)
    except UserError as e:
        assert str(e).startswith(f"{path}: ") and "\n" not in str(e), str(e)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 4e6 + 16 * os.path.getsize(path)
    assert time.perf_counter() - start < 10


HOSTILE = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@HOSTILE
@given(data=st.binary(max_size=600))
def test_random_bytes(tmp_path, data):
    path = tmp_path / "random.gguf"
    path.write_bytes(data)
    open_or_refuse(str(path), str(tmp_path))


@HOSTILE
@given(version=st.sampled_from([2, 3]), counts=st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
       tail=st.binary(max_size=600))
def test_random_headers(tmp_path, version, counts, tail):
    path = tmp_path / "header.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", version, *counts) + tail)
    open_or_refuse(str(path), str(tmp_path))


@pytest.fixture(scope="module")
def good_files(folder):
    """The bytes of small good files and where their tensor data starts."""
    files = []
    for w in (written(folder, "Q4_0", "gpt2", n_layers=1), written(folder, "Q8_0", "llama", n_layers=1)):
        data = open(w.path, "rb").read()
        files.append((data, min(e.start for e in gguf_format.Checkpoint(w.path)._entries.values())))
    return files


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(choice=st.data())
def test_mutated_and_truncated_files(tmp_path, good_files, choice):
    data, header_end = choice.draw(st.sampled_from(good_files))
    spoiled = bytearray(data)
    for _ in range(choice.draw(st.integers(1, 8))):
        # mostly the header, where every count and length lies; sometimes anywhere
        end = choice.draw(st.sampled_from([header_end, len(data)]))
        at = choice.draw(st.integers(0, end - 1))
        spoiled[at] = choice.draw(st.one_of(st.integers(0, 255), st.sampled_from([0, 1, 0x7F, 0x80, 0xFF])))
    if choice.draw(st.booleans()):
        spoiled = spoiled[:choice.draw(st.integers(0, len(spoiled)))]
    path = tmp_path / "mutated.gguf"
    path.write_bytes(bytes(spoiled))
    open_or_refuse(str(path), str(tmp_path))
