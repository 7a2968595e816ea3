"""formats/gguf/writer.py: any checkpoint of this toolkit written as a llama GGUF file.

The references share no code with the writer: llama.cpp's own reader (the gguf package) for the
tensor bytes and metadata, transformers' GGUF loader for the logits and the tokenizer, this
toolkit's model on the MLX folder, the original GGUF files, and llama.cpp's converter's formula.
"""

import base64
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")
pytest.importorskip("sentencepiece")
pytest.importorskip("accelerate")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import mlx.core as mx  # noqa: E402  (conftest imported utils first)

import chat  # noqa: E402
import convert  # noqa: E402
import loading  # noqa: E402
import models  # noqa: E402
from checkpoints import ASSETS, make_checkpoint  # noqa: E402
from models import NAMES  # noqa: E402
from formats import gguf as gguf_format  # noqa: E402
from formats import mlx as mlx_format  # noqa: E402
from formats.gguf.config import LLAMA_CPP_END_NAMES  # noqa: E402
from gguf_files import write_gguf  # noqa: E402
from hf_checkpoints import make_hf_model  # noqa: E402
from helpers import byte_level_tokenizer, hf_llama3_factors  # noqa: E402
from utils import UserError  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM = loading.DEFAULT_MODEL
MISTRAL_TOKENIZER = os.path.join(ASSETS, "tokenizers", "mistral-7b-v0.1.model")
# Text a tokenizer must get right: accents, emoji, CJK, runs of spaces and tabs, newlines, digits,
# special tokens written in text.
TEXTS = ["Hello world!", "Café déjà vu, naïve façade — Ærøskøbing, Straße", "日本語のテキスト、中文字符 한국어 문장",
         "emoji 🙂👍🏽 and 🇫🇷 flags", "  multiple   spaces\t\ttabs \t mixed", "\n\nnewlines\r\n end  \n",
         "<|im_start|>user\nWhat is MLX?<|im_end|>\n<|im_start|>assistant\n", "don't you're I'LL we've",
         "x = f(y) + {a: [b]}; // code", "Numbers 12345, 3.14159 and 2024-01-01", "Ελληνικά Русский عربي",
         " ", ""]
TOKENS = np.random.default_rng(0).integers(3, 300, size=(2, 40))  # past the llama3 scaling's original 16


def export(checkpoint_path, out_dir, types=None, **options):
    """Write the model folder (or GGUF file) as out_dir/model.gguf; `types` default tensor_types(**options)."""
    checkpoint = mlx_format.Checkpoint(str(checkpoint_path)) if os.path.isdir(checkpoint_path) \
        else gguf_format.Checkpoint(str(checkpoint_path))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "model.gguf")
    gguf_format.write(checkpoint, path, types or gguf_format.tensor_types(checkpoint, **options))
    return path


def tensors(path):
    """{GGUF name: (ggml type name, bytes)}, read by llama.cpp's own reader."""
    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(path).tensors}


def metadata(path, key):
    field = gguf.GGUFReader(path).fields.get(key)
    return None if field is None else field.contents()


def toolkit_logits(folder, tokens=TOKENS):
    return np.array(loading.load_model(str(folder))[0](mx.array(tokens)))


def transformers_logits(path, tokens=TOKENS, **config):
    """transformers' own GGUF loader: its config, weights (dequantized by the gguf package) and forward."""
    model = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                              dtype=torch.float32, **config)
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens))).logits.numpy()


def converted_back(path, folder):
    """The GGUF file converted into an MLX folder by convert.py (its types kept)."""
    convert.convert(str(path), str(folder))
    return str(folder)


def refused(checkpoint, path, *fragments):
    """write() raises one UserError line saying `fragments`, and leaves nothing at `path`."""
    with pytest.raises(UserError) as caught:
        gguf_format.write(checkpoint, str(path), gguf_format.tensor_types(checkpoint))
    message = str(caught.value)
    assert "\n" not in message and all(f in message for f in fragments), message
    assert not os.path.exists(path)
    return message


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A tiny transformers llama with a byte-level BPE (ChatML specials and template), converted
    to an MLX folder in float32."""
    root = tmp_path_factory.mktemp("llama")
    tokenizer = byte_level_tokenizer(root / "hf")
    make_hf_model(root / "hf", "llama", vocab_size=len(tokenizer))
    convert.convert(str(root / "hf"), str(root / "mlx"), dtype="float32")
    return root / "mlx"


# ----------------------------------------------------------------------------- GGUF -> MLX -> GGUF

@pytest.mark.parametrize("tensor_type, vocab", [("Q4_1", "gpt2"), ("Q8_0", "gpt2"), ("Q4_1", "llama")])
def test_a_gguf_comes_back_with_the_same_tensor_bytes(tmp_path, tensor_type, vocab):
    """GGUF -> convert.py -> MLX folder (4- and 8-bit affine, groups of 32, float16 scales) -> GGUF:
    every tensor the same bytes (Q8_0 too: its biases are -128 scale, so its codes come back), and
    the reader finds the same config and tokenizer."""
    original = write_gguf(str(tmp_path / "original.gguf"), tensor_type, vocab).path
    convert.convert(original, str(tmp_path / "mlx"))
    path = export(tmp_path / "mlx", tmp_path / "out")
    assert tensors(path) == tensors(original)
    assert tensors(export(original, tmp_path / "direct")) == tensors(original)  # the GGUF checkpoint itself
    assert all(t == tensor_type for t, _ in tensors(path).values() if t != "F32")
    assert gguf_format.Checkpoint(path).config == gguf_format.Checkpoint(original).config
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.scores", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.unknown_token_id",
                "tokenizer.chat_template"):
        assert metadata(path, key) == metadata(original, key), key
    for folder, source in (("tok_original", original), ("tok_export", path)):
        os.makedirs(tmp_path / folder)
        gguf_format.Checkpoint(source).write_tokenizer(str(tmp_path / folder))
    for name in os.listdir(tmp_path / "tok_original"):
        assert (tmp_path / "tok_original" / name).read_bytes() == (tmp_path / "tok_export" / name).read_bytes()
    assert metadata(path, "general.file_type") == {"Q4_1": 3, "Q8_0": 7}[tensor_type]
    assert metadata(path, "general.quantization_version") == 2


def test_q4_0_comes_back_as_q4_1_with_the_same_values(tmp_path):
    """Q4_0 (d (q - 8)) is MLX's 4-bit with bias -8 d: written as Q4_1 (d q + m), every value kept."""
    original = write_gguf(str(tmp_path / "original.gguf"), "Q4_0").path
    convert.convert(original, str(tmp_path / "mlx"))
    path = export(tmp_path / "mlx", tmp_path / "out")
    before, after = tensors(original), tensors(path)
    for name, (kind, raw) in before.items():
        assert after[name][0] == ("Q4_1" if kind == "Q4_0" else kind)
        values = [gguf.quants.dequantize(np.frombuffer(r, np.uint8), gguf.GGMLQuantizationType[k])
                  for k, r in (before[name], after[name])]
        assert np.array_equal(*values), name


@pytest.mark.parametrize("dtype, exact", [("float16", True), ("bfloat16", True), ("float32", False)])
def test_mlx_4_bit_groups_of_32_are_q4_1_exactly_when_float16_holds_the_scales(tmp_path, llama_folder, dtype,
                                                                               exact):
    """convert.py -q (4 bits, groups of 32): float16 and bfloat16 scales go into Q4_1 blocks as they
    are; float32 ones float16 would round are quantized again, from the float32 weight."""
    convert.convert(str(llama_folder), str(tmp_path / "mlx"), quantize=True, q_bits=4, q_group_size=32, dtype=dtype)
    checkpoint = mlx_format.Checkpoint(str(tmp_path / "mlx"))
    path = export(tmp_path / "mlx", tmp_path / "out")
    for name, (kind, raw) in tensors(path).items():
        ours = gguf_format.our_name(models.NAMES, name)
        if len(checkpoint.shapes[ours]) == 1:
            continue
        assert kind == "Q4_1"
        values = gguf.quants.dequantize(np.frombuffer(raw, np.uint8), gguf.GGMLQuantizationType.Q4_1)
        mlx_values = np.array(checkpoint.tensor(ours)).reshape(-1)
        scale = float(mx.abs(checkpoint.quantized(ours)[1]).max())
        assert np.array_equal(values, mlx_values) == exact, name
        assert np.abs(values - mlx_values).max() <= 0.51 * scale  # within half a step of Q4_1's grid


# ----------------------------------------------------------------------------- transformers reads it

# Each export, and the MLX folder convert.py makes the same way: its error is the export's own cost.
EXPORTS = {"F32": ({"dtype": "float32"}, None), "F16": ({"dtype": "float16"}, {"dtype": "float16"}),
           "BF16": ({"dtype": "bfloat16"}, {"dtype": "bfloat16"}),
           "Q8_0": ({"bits": 8}, {"quantize": True, "q_bits": 8, "q_group_size": 32}),
           "Q4_1": ({"bits": 4}, {"quantize": True, "q_bits": 4, "q_group_size": 32}),
           "Q4_0": (None, {"quantize": True, "q_bits": 4, "q_group_size": 32})}


@pytest.mark.parametrize("kind", EXPORTS)
def test_transformers_computes_the_same_logits(tmp_path, llama_folder, kind):
    """transformers' GGUF loader on each export: the float32 one within 1e-4 of this toolkit's model
    on the MLX folder; the others within 1e-4 of this toolkit reading the export back (convert.py),
    and as close to the float model as the MLX folder converted the same way is (1.5 times)."""
    checkpoint = mlx_format.Checkpoint(str(llama_folder))
    options, same_way = EXPORTS[kind]
    types = None if options else {name: kind if len(shape) == 2 else "F32" for name, shape in checkpoint.shapes.items()}
    path = export(llama_folder, tmp_path / "out", types, **(options or {}))
    assert {t for t, _ in tensors(path).values()} == {kind, "F32"}
    assert metadata(path, "general.file_type") == {"F32": 0, "F16": 1, "BF16": 32, "Q8_0": 7, "Q4_1": 3,
                                                   "Q4_0": 2}[kind]
    theirs, reference = transformers_logits(path), toolkit_logits(llama_folder)
    if kind == "F32":
        assert np.abs(theirs - reference).max() <= 1e-4
        assert np.array_equal(theirs.argmax(-1), reference.argmax(-1))
        return
    assert np.abs(theirs - toolkit_logits(converted_back(path, tmp_path / "back"))).max() <= 1e-4
    convert.convert(str(llama_folder), str(tmp_path / "same_way"), **same_way)
    cost = np.abs(toolkit_logits(tmp_path / "same_way") - reference).max()
    assert np.abs(theirs - reference).max() <= 1.5 * cost + 1e-4, cost


def test_a_tied_model_has_no_output_tensor(tmp_path):
    make_hf_model(tmp_path / "hf", "llama", tie_word_embeddings=True)
    byte_level_tokenizer(tmp_path / "hf")
    convert.convert(str(tmp_path / "hf"), str(tmp_path / "mlx"), dtype="float32")
    path = export(tmp_path / "mlx", tmp_path / "out")
    assert "output.weight" not in tensors(path) and "token_embd.weight" in tensors(path)
    assert np.abs(transformers_logits(path) - toolkit_logits(tmp_path / "mlx")).max() <= 1e-4
    assert gguf_format.Checkpoint(path).config["tie_word_embeddings"] is True


@pytest.mark.parametrize("flavour", ["llama3", "linear"])
def test_rope_scaling_is_written_as_llama_cpp_reads_it(tmp_path, flavour):
    """llama3: a rope_freqs.weight of llama.cpp's factors; linear: llama.rope.scaling.*. The reader
    recovers the same scaling. transformers' GGUF loader reads neither for llama (it ignores
    llama.rope.scaling.* and rope_freqs), so it is given the scaling to check the rest of the file."""
    reference = make_hf_model(tmp_path / "hf", flavour)
    byte_level_tokenizer(tmp_path / "hf")
    convert.convert(str(tmp_path / "hf"), str(tmp_path / "mlx"), dtype="float32")
    config = mlx_format.Checkpoint(str(tmp_path / "mlx")).config
    path = export(tmp_path / "mlx", tmp_path / "out")
    if flavour == "llama3":
        rope_freqs = np.frombuffer(tensors(path)["rope_freqs.weight"][1], np.float32)
        scaling = config["rope_scaling"]
        expected = hf_llama3_factors(config["rope_theta"], config["head_dim"], scaling["factor"],
                                     scaling["low_freq_factor"], scaling["high_freq_factor"],
                                     scaling["original_max_position_embeddings"])
        np.testing.assert_allclose(rope_freqs, expected, rtol=1e-6)
        assert metadata(path, "llama.rope.scaling.type") is None
    else:
        assert metadata(path, "llama.rope.scaling.type") == "linear"
        assert metadata(path, "llama.rope.scaling.factor") == 4.0
        assert metadata(path, "llama.attention.key_length") == metadata(path, "llama.rope.dimension_count") == 24
    assert gguf_format.Checkpoint(path).config["rope_scaling"] == config["rope_scaling"]
    ours = toolkit_logits(tmp_path / "mlx")
    rope = dict(reference.config.rope_parameters)
    assert np.abs(transformers_logits(path, rope_parameters=rope) - ours).max() <= 1e-4
    unscaled = {"rope_type": "default", "rope_theta": rope["rope_theta"]}  # the guard: the scaling matters here
    assert np.abs(transformers_logits(path, rope_parameters=unscaled) - ours).max() > 1e-2


def test_the_metadata_llama_cpp_needs(tmp_path, llama_folder):
    path = export(llama_folder, tmp_path / "out")
    expected = {"general.architecture": "llama", "general.name": "mlx", "llama.block_count": 2,
                "llama.context_length": 256, "llama.embedding_length": 64, "llama.feed_forward_length": 128,
                "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
                "llama.attention.key_length": 16, "llama.attention.value_length": 16,
                "llama.rope.dimension_count": 16, "llama.rope.freq_base": 10000.0, "llama.vocab_size": 300,
                "general.file_type": 0, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
                "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
                "tokenizer.ggml.add_bos_token": False}
    assert {key: metadata(path, key) for key in expected} == expected
    assert metadata(path, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert metadata(path, "general.quantization_version") is None  # nothing quantized


def test_a_config_without_context_length_gets_4096(tmp_path):
    make_checkpoint(tmp_path / "meta", "llama2", n_layers=1)
    convert.convert(str(tmp_path / "meta"), str(tmp_path / "mlx"), dtype="float32")
    assert "context_length" not in mlx_format.Checkpoint(str(tmp_path / "mlx")).config
    assert metadata(export(tmp_path / "mlx", tmp_path / "out"), "llama.context_length") == 4096


# ----------------------------------------------------------------------------- tokenizers

def assert_tokenizers_agree(mlx_folder, path, back, texts=TEXTS, sentencepiece=False):
    """transformers' GGUF tokenizer and this toolkit's tokenizer of the file converted back encode
    every text as the MLX folder's tokenizer does; the chat template survives.

    transformers' SentencePiece from GGUF adds no prefix space before text that starts with one
    ("  x": two spaces where SentencePiece and llama.cpp have three), the original file's too: those
    texts are left to this toolkit's tokenizer."""
    ours = loading.load_model(str(mlx_folder))[1]
    theirs = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    _, again, _ = loading.load_model(converted_back(path, back))
    for text in texts:
        expected = ours.encode(text, bos=False)
        if not (sentencepiece and text[:1].isspace()):
            assert theirs.encode(text, add_special_tokens=False) == expected, text
        assert again.encode(text, bos=False) == expected, text
    named = {t for t in range(again.vocab_size) if again.piece(t) in LLAMA_CPP_END_NAMES}  # ends llama.cpp adds
    assert (again.bos_id, again.eos_ids, again.add_bos) == (ours.bos_id, ours.eos_ids | named, ours.add_bos)
    assert chat.load_template(back) == chat.load_template(str(mlx_folder))


def test_byte_level_bpe_tokenizer_json(tmp_path, llama_folder):
    path = export(llama_folder, tmp_path / "out")
    assert chat.load_template(str(llama_folder)) is not None
    assert_tokenizers_agree(llama_folder, path, tmp_path / "back")
    types = metadata(path, "tokenizer.ggml.token_type")
    assert types[:3] == [3, 3, 3] and set(types[3:]) == {1}  # ChatML's specials are control tokens


def hf_pre_tokenizer(form):
    """A pre-tokenizer as Hugging Face's tokenizer.json files write it."""
    from tokenizers import Regex, pre_tokenizers

    from tokenizer import LLAMA3_PATTERN

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=form == "smollm")
    pre = {"gpt-2": pre_tokenizers.ByteLevel(add_prefix_space=False),  # GPT-2's own regex inside
           "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]),
           "llama-bpe": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), "isolated"),
                                                 byte_level])}[form]
    return json.loads(pre.__getstate__())


@pytest.mark.parametrize("form, ignore_merges, name", [("gpt-2", False, "gpt-2"), ("smollm", False, "smollm"),
                                                        ("llama-bpe", True, "llama-bpe"),
                                                        ("llama-bpe", False, "smaug-bpe")])
def test_hugging_face_pre_tokenizers_are_named(tmp_path, llama_folder, form, ignore_merges, name):
    """GPT-2's ByteLevel, SmolLM's Digits then ByteLevel, Llama 3's Split (llama-bpe where whole
    pieces are looked up before merging, as Llama 3's tokenizer.json says, else smaug-bpe): named
    for llama.cpp, and the file read back splits and merges as the folder's tokenizer.json does."""
    shutil.copytree(llama_folder, tmp_path / "mlx")
    data = json.loads((tmp_path / "mlx" / "tokenizer.json").read_text())
    data["pre_tokenizer"] = hf_pre_tokenizer(form)
    data["model"]["ignore_merges"] = ignore_merges
    (tmp_path / "mlx" / "tokenizer.json").write_text(json.dumps(data))
    path = export(tmp_path / "mlx", tmp_path / "out")
    assert metadata(path, "tokenizer.ggml.pre") == name
    ours = loading.load_model(str(tmp_path / "mlx"))[1]
    again = loading.load_model(converted_back(path, tmp_path / "back"))[1]
    for text in TEXTS:
        assert again.encode(text, bos=False) == ours.encode(text, bos=False), text


@pytest.mark.parametrize("name", sorted(gguf_format.PRE_SPLITS))
def test_the_readers_pre_tokenizers_are_named_back(tmp_path, name):
    """Whatever tokenizer.ggml.pre a file had, the folder's tokenizer.json is named back to one that
    splits and merges the same way (smollm for starcoder's splits, say)."""
    original = write_gguf(str(tmp_path / "original.gguf"), pre=name).path
    convert.convert(original, str(tmp_path / "mlx"))
    path = export(tmp_path / "mlx", tmp_path / "out")
    named = metadata(path, "tokenizer.ggml.pre")
    assert gguf_format.PRE_SPLITS[named] == gguf_format.PRE_SPLITS[name]
    assert (named in gguf_format.LLAMA3_PRES) == (name in gguf_format.LLAMA3_PRES)  # merged the same way


def test_sentencepiece_tokenizer_model(tmp_path):
    make_checkpoint(tmp_path / "meta", "llama2", n_layers=1)
    convert.convert(str(tmp_path / "meta"), str(tmp_path / "mlx"), dtype="float32")
    path = export(tmp_path / "mlx", tmp_path / "out")
    assert metadata(path, "tokenizer.ggml.model") == "llama"
    assert metadata(path, "tokenizer.ggml.add_space_prefix") is True
    assert metadata(path, "tokenizer.ggml.unknown_token_id") == 0
    assert_tokenizers_agree(tmp_path / "mlx", path, tmp_path / "back", [t for t in TEXTS if "<|" not in t],
                            sentencepiece=True)
    assert loading.load_model(str(tmp_path / "back"))[1].encode("hi")[0] == 1  # BOS, as SentencePiece adds it


@pytest.mark.skipif(not os.path.exists(MISTRAL_TOKENIZER), reason="../shared/assets/tokenizers is not available")
def test_mistral_sentencepiece_vocabulary(tmp_path):
    """A real vocabulary: 32000 pieces, byte fallback, digits split."""
    original = write_gguf(str(tmp_path / "original.gguf"), "F16", "llama", spm_model=MISTRAL_TOKENIZER).path
    convert.convert(original, str(tmp_path / "mlx"))
    path = export(tmp_path / "mlx", tmp_path / "out")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        assert metadata(path, key) == metadata(original, key), key
    assert_tokenizers_agree(tmp_path / "mlx", path, tmp_path / "back", [t for t in TEXTS if "<|" not in t],
                            sentencepiece=True)


def tiktoken_ranks(path, vocab_size=600):
    """A rank file in Llama 3's format from a byte-level BPE trained here with Llama 3's split: the
    256 bytes, then each merged token in the order it was learned."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    from tokenizer import LLAMA3_PATTERN

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), "isolated"),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator([t for t in TEXTS if "<|" not in t] * 20, trainer)
    unspelled = {c: b for b, c in enumerate(gguf_format.byte_spelling())}
    vocab = tokenizer.get_vocab()
    with open(path, "w") as f:
        for rank, token in enumerate(sorted(vocab, key=vocab.get)):
            f.write(f"{base64.b64encode(bytes(unspelled[c] for c in token)).decode()} {rank}\n")
    return len(vocab)


def test_llama3_tiktoken_becomes_byte_level_bpe(tmp_path):
    """Llama 3's tokenizer.model (tiktoken ranks) as llama.cpp's llama-bpe vocabulary: the tokens
    spelled in GPT-2's alphabet, merges from the ranks, the 256 specials as control tokens."""
    n_ranks = tiktoken_ranks(tmp_path / "ranks")
    make_hf_model(tmp_path / "hf", "llama", vocab_size=n_ranks + 256)
    shutil.copyfile(tmp_path / "ranks", tmp_path / "hf" / "tokenizer.model")
    convert.convert(str(tmp_path / "hf"), str(tmp_path / "mlx"), dtype="float32")
    config = json.loads((tmp_path / "mlx" / "config.json").read_text())
    begin, end, eom, eot = (n_ranks + i for i in (0, 1, 8, 9))  # as Meta's Llama 3.1 folders say
    config.update(bos_token_id=begin, eos_token_ids=[end, eom, eot], add_bos_token=True)
    (tmp_path / "mlx" / "config.json").write_text(json.dumps(config))
    path = export(tmp_path / "mlx", tmp_path / "out")
    assert (metadata(path, "tokenizer.ggml.model"), metadata(path, "tokenizer.ggml.pre")) == ("gpt2", "llama-bpe")
    assert [metadata(path, f"tokenizer.ggml.{key}_token_id") for key in ("bos", "eos", "eot", "eom")] == \
        [begin, end, eot, eom]
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    assert gguf_format.byte_spelling() == [bytes_to_unicode()[b] for b in range(256)]
    tokens = metadata(path, "tokenizer.ggml.tokens")
    assert tokens[n_ranks] == "<|begin_of_text|>" and set(tokens[:256]) == set(gguf_format.byte_spelling())
    assert metadata(path, "tokenizer.ggml.token_type")[n_ranks:] == [3] * 256
    texts = TEXTS + ["<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"]
    assert_tokenizers_agree(tmp_path / "mlx", path, tmp_path / "back", [t for t in texts if "<|im" not in t])


def test_a_vocabulary_smaller_than_the_model_is_padded(tmp_path):
    """[PADn] tokens (unused) up to the embedding's rows, as llama.cpp's converter fills them."""
    tokenizer = byte_level_tokenizer(tmp_path / "hf")
    make_hf_model(tmp_path / "hf", "llama", vocab_size=len(tokenizer) + 20)
    convert.convert(str(tmp_path / "hf"), str(tmp_path / "mlx"), dtype="float32")
    path = export(tmp_path / "mlx", tmp_path / "out")
    assert metadata(path, "tokenizer.ggml.tokens")[-1] == f"[PAD{len(tokenizer) + 19}]"
    assert metadata(path, "tokenizer.ggml.token_type")[-20:] == [5] * 20
    assert gguf_format.Checkpoint(path).config["vocab_size"] == len(tokenizer) + 20


# ----------------------------------------------------------------------------- the real SmolLM2

@pytest.mark.skipif(not os.path.isdir(SMOLLM), reason="checkpoints/SmolLM2-135M-Instruct is not there (setup.sh)")
def test_smollm2_comes_back_as_its_original_file(tmp_path):
    """The default model folder (made by setup.sh from the Q4_1 GGUF) written with the default types:
    Q4_1 layers and a Q8_0 embedding, byte for byte the original's, and the same logits."""
    original = loading.DEFAULT_GGUF
    path = export(SMOLLM, tmp_path / "out")
    assert abs(os.path.getsize(path) - os.path.getsize(original)) <= 0.001 * os.path.getsize(original)
    ours, theirs = gguf_format.Checkpoint(path), gguf_format.Checkpoint(original)
    assert ours.config == theirs.config
    for name in ours.shapes:
        assert ours.quantization(name) == theirs.quantization(name)
        if ours.quantization(name) is not None:
            assert all(np.array_equal(np.array(a), np.array(b))
                       for a, b in zip(ours.quantized(name), theirs.quantized(name))), name
    assert tensors(path) == tensors(original)
    tokenizer = loading.load_model(SMOLLM)[1]
    prompt = chat.render(chat.load_template(SMOLLM), [{"role": "user", "content": "What is MLX?"}], tokenizer)
    tokens = [tokenizer.encode(prompt, bos=False)]
    assert np.abs(transformers_logits(path, tokens) - transformers_logits(original, tokens)).max() <= 2e-3


# ----------------------------------------------------------------------------- refusals

def test_a_sliding_window_is_refused(tmp_path):
    make_hf_model(tmp_path / "hf", "mistral")
    byte_level_tokenizer(tmp_path / "hf")
    convert.convert(str(tmp_path / "hf"), str(tmp_path / "mlx"), dtype="float32")
    checkpoint = mlx_format.Checkpoint(str(tmp_path / "mlx"))
    message = refused(checkpoint, tmp_path / "out.gguf", "sliding window", "llama.cpp")
    assert message.startswith(str(tmp_path / "mlx"))


@pytest.mark.parametrize("pre_tokenizer", [
    {"type": "Whitespace"},
    {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
    {"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": "[a-z]+"}, "behavior": "Isolated",
                                            "invert": False},
                                           {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}])
def test_a_pre_tokenizer_llama_cpp_has_no_name_for_is_refused(tmp_path, llama_folder, pre_tokenizer):
    shutil.copytree(llama_folder, tmp_path / "mlx")
    data = json.loads((tmp_path / "mlx" / "tokenizer.json").read_text())
    data["pre_tokenizer"] = pre_tokenizer
    (tmp_path / "mlx" / "tokenizer.json").write_text(json.dumps(data))
    checkpoint = mlx_format.Checkpoint(str(tmp_path / "mlx"))
    refused(checkpoint, tmp_path / "out.gguf", str(tmp_path / "mlx"),
            "cannot name this tokenizer's pre-tokenizer for llama.cpp")


def test_weights_float16_cannot_hold_are_refused(tmp_path, llama_folder):
    shutil.copytree(llama_folder, tmp_path / "mlx")
    weights = dict(mx.load(str(tmp_path / "mlx" / "weights.npz")))
    weights["layers.1.attention.wo.weight"] = weights["layers.1.attention.wo.weight"] * 1e6
    mx.eval(weights)  # read whole before the file is written over
    mx.savez(str(tmp_path / "mlx" / "weights.npz"), **weights)
    checkpoint = mlx_format.Checkpoint(str(tmp_path / "mlx"))
    out = tmp_path / "out.gguf"
    with pytest.raises(UserError, match="layers.1.attention.wo.weight is not finite in F16"):
        gguf_format.write(checkpoint, str(out), gguf_format.tensor_types(checkpoint, dtype="float16"))
    assert not out.exists()


def test_tensor_type_choices_are_checked(llama_folder):
    checkpoint = mlx_format.Checkpoint(str(llama_folder))
    with pytest.raises(UserError, match="bits must be 4"):
        gguf_format.tensor_types(checkpoint, bits=3)
    with pytest.raises(UserError, match="dtype must be one of"):
        gguf_format.tensor_types(checkpoint, dtype="int8")


# ----------------------------------------------------------------------------- tensor types

class Stub:
    """The parts of a checkpoint tensor_types reads: shapes, quantization, stored_dtype."""

    def __init__(self, shapes, quantization=None, stored="float16"):
        self.shapes, self._q, self._stored = shapes, quantization or {}, stored

    def quantization(self, name):
        return self._q.get(name)

    def stored_dtype(self, name):
        return None if name in self._q else self._stored


def test_tensor_types():
    shapes = {"norm.weight": (64,), "a.weight": (96, 64), "b.weight": (64, 80), "c.weight": (64, 64),
              "d.weight": (64, 64)}
    quantized = {"a.weight": (64, 4), "b.weight": (32, 8), "c.weight": (32, 6), "d.weight": (32, 2)}
    assert gguf_format.tensor_types(Stub(shapes, quantized)) == {
        "norm.weight": "F32", "a.weight": "Q4_1", "b.weight": "Q8_0", "c.weight": "Q8_0", "d.weight": "Q4_1"}
    assert gguf_format.tensor_types(Stub(shapes, stored="bfloat16")) == dict.fromkeys(shapes, "BF16") | {
        "norm.weight": "F32"}
    assert gguf_format.tensor_types(Stub(shapes, quantized), dtype="float32") == dict.fromkeys(shapes, "F32")
    # rows of 80 are not whole blocks of 32: those stay float
    assert gguf_format.tensor_types(Stub(shapes), bits=4) == {
        "norm.weight": "F32", "a.weight": "Q4_1", "b.weight": "F16", "c.weight": "Q4_1", "d.weight": "Q4_1"}
    assert gguf_format.tensor_types(Stub(shapes), bits=8, dtype="bfloat16")["b.weight"] == "BF16"


# ----------------------------------------------------------------------------- streaming

STREAMING_SCRIPT = """
import sys
sys.path[:0] = [{root!r}, {tests!r}]
import utils
import mlx.core as mx
from formats import gguf as gguf_format
from formats import mlx as mlx_format
from models import NAMES

class Generated:
    '''A model whose every weight is drawn when read: nothing of it is held between tensors.'''
    def __init__(self, folder, config):
        self.path, self.config, self.shapes = folder, config, NAMES.shapes(config)
        self.tokenizer = mlx_format.Checkpoint(folder)
    def stored_dtype(self, name): return "float32"
    def quantization(self, name): return None
    def tensor(self, name):
        return mx.random.normal(self.shapes[name], key=mx.random.key(len(name))) * 0.02
    def write_tokenizer(self, folder): self.tokenizer.write_tokenizer(folder)

config = dict(mlx_format.Checkpoint({folder!r}).config, dim=1024, hidden_dim=4096, n_heads=8, n_kv_heads=8,
              head_dim=128, n_layers={n_layers})
checkpoint = Generated({folder!r}, config)
types = gguf_format.tensor_types(checkpoint, dtype="float16")
types["tok_embeddings.weight"] = types["layers.0.feed_forward.w1.weight"] = "Q8_0"
def status(key):  # kB
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1])

before = status("VmRSS:")
gguf_format.write(checkpoint, {out!r}, types)
print((status("VmHWM:") - before) * 1024)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the peak memory off Linux's /proc")
def test_tensors_are_written_one_at_a_time(tmp_path, llama_folder):
    """Peak memory grows by about one tensor, not with the model: twelve layers of 1024 x 4096
    (800 MB in float32) are written in a fraction of that."""
    out = tmp_path / "big.gguf"
    script = STREAMING_SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, "tests"), folder=str(llama_folder),
                                     out=str(out), n_layers=12)
    grown = int(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                               text=True).stdout.split()[-1])
    model_bytes = sum(np.prod(s) for s in NAMES.shapes(dict(
        mlx_format.Checkpoint(str(llama_folder)).config, dim=1024, hidden_dim=4096, n_heads=8, n_kv_heads=8,
        head_dim=128, n_layers=12)).values()) * 4
    assert grown < 150 * 2**20 and grown < model_bytes / 5, (grown, model_bytes)
    reread = gguf_format.Checkpoint(str(out))
    assert reread.config["n_layers"] == 12 and reread.quantization("tok_embeddings.weight") == (32, 8)
    assert reread.stored_dtype("layers.11.attention.wq.weight") == "float16"
