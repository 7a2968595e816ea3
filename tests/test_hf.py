"""Hugging Face folders in: tiny checkpoints written by transformers, converted, and their
logits against transformers' own forward pass; tokenizer.json and chat templates."""

import json
import os
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")

import mlx.core as mx  # noqa: E402

import chat  # noqa: E402
import convert  # noqa: E402
import loading  # noqa: E402
from checkpoints import make_tokenizer  # noqa: E402
from hf_checkpoints import hf_logits, make_hf_model  # noqa: E402
from utils import UserError  # noqa: E402
from helpers import SAMPLES, byte_level_tokenizer  # noqa: E402

TOKENS = np.random.default_rng(0).integers(3, 320, size=(2, 40))  # longer than the window (8) and the
                                                                   # llama3 scaling's original context (16)


def converted(folder, out, **options):
    options.setdefault("dtype", "float32")
    convert.convert(str(folder), str(out), **options)
    return loading.load_model(str(out))


def mlx_logits(model, tokens):
    return np.array(model(mx.array(tokens)).astype(mx.float32))


@pytest.mark.parametrize("flavour", ["llama", "llama3", "mistral", "linear"])
def test_logits_match_transformers(tmp_path, flavour):
    reference = make_hf_model(tmp_path / "hf", flavour)
    make_tokenizer(tmp_path / "hf")
    assert len([n for n in os.listdir(tmp_path / "hf") if n.endswith(".safetensors")]) > 1  # sharded
    model, _, config = converted(tmp_path / "hf", tmp_path / "mlx")
    assert np.abs(mlx_logits(model, TOKENS) - hf_logits(reference, TOKENS)).max() <= 1e-4
    assert config["tie_word_embeddings"] == (flavour == "llama3")
    assert "output" not in model or flavour != "llama3"


@pytest.mark.parametrize("flavour, change", [("llama3", {"rope_scaling": None}), ("mistral", {"sliding_window": None}),
                                             ("linear", {"rope_scaling": None})])
def test_dropping_the_scaling_or_the_window_moves_the_logits(tmp_path, flavour, change):
    """Guards the test above: what these checkpoints add must matter at these lengths."""
    reference = make_hf_model(tmp_path / "hf", flavour)
    make_tokenizer(tmp_path / "hf")
    convert.convert(str(tmp_path / "hf"), str(tmp_path / "mlx"), dtype="float32")
    config = json.loads((tmp_path / "mlx" / "config.json").read_text())
    (tmp_path / "mlx" / "config.json").write_text(json.dumps(dict(config, **change)))
    model, _, _ = loading.load_model(str(tmp_path / "mlx"))
    assert np.abs(mlx_logits(model, TOKENS) - hf_logits(reference, TOKENS)).max() > 1e-2


def test_classic_config_layout_and_pytorch_bin_weights(tmp_path):
    """config.json as released checkpoints write it (rope_theta and rope_scaling at the top),
    and weights in one pytorch_model.bin."""
    import torch

    reference = make_hf_model(tmp_path / "hf", "llama3", max_shard_size="1GB")
    make_tokenizer(tmp_path / "hf")
    os.remove(tmp_path / "hf" / "model.safetensors")  # as older transformers saved it
    torch.save(reference.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    model, _, _ = converted(tmp_path / "hf", tmp_path / "mlx")
    assert np.abs(mlx_logits(model, TOKENS) - hf_logits(reference, TOKENS)).max() <= 1e-4


# ----------------------------------------------------------------------------- tokenizer.json


def test_tokenizer_json_encodes_as_transformers(tmp_path):
    reference = byte_level_tokenizer(tmp_path / "hf")
    make_hf_model(tmp_path / "hf", "llama", vocab_size=len(reference))
    _, tokenizer, config = converted(tmp_path / "hf", tmp_path / "mlx")
    for text in SAMPLES:
        assert tokenizer.encode(text, bos=False) == reference.encode(text, add_special_tokens=False), text
        assert tokenizer.decode(tokenizer.encode(text, bos=False)) == text
    assert tokenizer.encode("<|im_start|>", bos=False) == [reference.convert_tokens_to_ids("<|im_start|>")]
    assert not tokenizer.add_bos and tokenizer.encode("hi") == tokenizer.encode("hi", bos=False)  # no BOS here


def test_streaming_a_byte_level_tokenizer_never_splits_a_character(tmp_path):
    """Byte-level BPE spells a character it has no token for in bytes, across several tokens:
    the stream holds them back until the character is whole."""
    import generate
    from tokenizer import HFTokenizer

    byte_level_tokenizer(tmp_path / "hf")
    tokenizer = HFTokenizer(str(tmp_path / "hf" / "tokenizer.json"))
    held_back = 0
    for text in SAMPLES:
        detok = generate.StreamingDetokenizer(tokenizer, [])
        ids = tokenizer.encode(text, bos=False)
        chunks = [detok.add(token) for token in ids] + [detok.flush()]
        assert "".join(chunks) == text and not any("\ufffd" in chunk for chunk in chunks), chunks
        held_back += chunks[:-1].count("")
    assert held_back > 0  # some characters did come in pieces


def test_chat_template_survives_conversion_and_renders_as_transformers(tmp_path):
    reference = byte_level_tokenizer(tmp_path / "hf")
    make_hf_model(tmp_path / "hf", "llama", vocab_size=len(reference))
    _, tokenizer, _ = converted(tmp_path / "hf", tmp_path / "mlx")
    template = chat.load_template(str(tmp_path / "mlx"))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is MLX?"}]
    ours = chat.render(template, messages, tokenizer)
    assert ours == reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.encode(ours, bos=False) == reference.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=False)


@pytest.mark.parametrize("template, message", [
    ("{{ raise_exception('only user and assistant roles') }}", "TemplateError: only user and assistant roles"),
    ("{{ messages.__class__.__mro__ }}", "SecurityError"),
    ("{{ raise_exception.__globals__ }}", "SecurityError"),
    ("{{ ''.__class__.__subclasses__() }}", "SecurityError"),
    ("{% for m in messages %}", "TemplateSyntaxError"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recurses without end"),
])
def test_a_template_that_raises_or_reaches_python_internals_is_a_clear_error(template, message):
    tokenizer = type("T", (), {"bos_id": None, "eos_id": None})()
    with pytest.raises(UserError, match=message):
        chat.render(template, [{"role": "user", "content": "hi"}], tokenizer, where="t.jinja")


# ----------------------------------------------------------------------------- bad folders

def test_unsupported_architecture_is_refused_by_name(tmp_path):
    make_hf_model(tmp_path / "hf", "llama")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps(dict(config, model_type="bloom")))
    with pytest.raises(UserError, match="architecture 'bloom' is not supported \\(supported: llama, mistral, qwen2"):
        convert.convert(str(tmp_path / "hf"), str(tmp_path / "mlx"))
    assert not os.path.exists(tmp_path / "mlx")


@pytest.mark.parametrize("damage, message", [
    ("missing_shard", "names the shard 'model-00002-of-"),
    ("missing_key", "missing 'intermediate_size'"),
    ("lying_offsets", "lies outside the file's"),
    ("lying_dtype", "bytes of data for a F16 tensor"),
    ("huge_header", "not a safetensors file \\(a header of"),
    ("unknown_scaling", "rope scaling 'yarn' is not supported"),
])
def test_bad_hugging_face_folders_are_one_line_errors(tmp_path, damage, message):
    import struct

    make_hf_model(tmp_path / "hf", "llama")
    make_tokenizer(tmp_path / "hf")
    folder = tmp_path / "hf"
    shard = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))[1]
    config = json.loads((folder / "config.json").read_text())
    if damage == "missing_shard":
        os.remove(folder / shard)
    elif damage == "missing_key":
        del config["intermediate_size"]
    elif damage == "unknown_scaling":
        config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    else:
        raw = (folder / shard).read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8:8 + n])
        name = next(k for k in header if k != "__metadata__")
        if damage == "lying_offsets":
            header[name]["data_offsets"][1] += 10**9
        elif damage == "lying_dtype":  # float32 data said to be float16: twice the bytes it should be
            header[name]["dtype"] = "F16"
        blob = json.dumps(header).encode()
        raw = (struct.pack("<Q", 2**40) if damage == "huge_header" else struct.pack("<Q", len(blob))) + blob + raw[8 + n:]
        (folder / shard).write_bytes(raw)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=message):
        convert.convert(str(folder), str(tmp_path / "mlx"))
    assert not os.path.exists(tmp_path / "mlx")
    shutil.rmtree(folder)


# ----------------------------------------------------------------------------- the header reader

@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_safetensors_header_reader_gives_tensors_or_a_clear_error(tmp_path_factory, data):
    """Random headers (lengths, JSON, dtypes, shapes, offsets) over random data: a file whose
    every tensor lies inside it, or a UserError; never another exception, never a read past it."""
    import struct

    from formats.safetensors import SafetensorsFile

    entry = st.fixed_dictionaries({
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", 7]),
        "shape": st.one_of(st.lists(st.integers(-2, 6), max_size=3), st.text(max_size=3)),
        "data_offsets": st.one_of(st.lists(st.integers(-5, 400), min_size=0, max_size=3), st.none())})
    header = data.draw(st.one_of(st.dictionaries(st.text(max_size=5), entry, max_size=4),
                                 st.lists(st.integers(), max_size=2)))
    blob = json.dumps(header).encode() if data.draw(st.booleans()) else data.draw(st.binary(max_size=40))
    length = data.draw(st.one_of(st.just(len(blob)), st.integers(0, 2**64 - 1)))
    body = data.draw(st.binary(max_size=300))
    path = tmp_path_factory.mktemp("st") / "x.safetensors"
    path.write_bytes(struct.pack("<Q", length) + blob + body)
    try:
        file = SafetensorsFile(str(path))
    except UserError as e:
        assert str(e).startswith(str(path))
        return
    for name, (dtype, shape) in file.tensors.items():
        assert file.array(name).shape == tuple(shape)


# ----------------------------------------------------------------------------- Meta's Llama 3 layout

def tiktoken_file(path, extra=("th", "he", "the", "in", "an", "and", " the", "er", "on")):
    """A small rank file in Llama 3's format: every byte, then a few merges."""
    import base64

    tokens = [bytes([b]) for b in range(256)] + [t.encode() for t in extra]
    with open(path, "w") as f:
        for rank, token in enumerate(tokens):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")
    return len(tokens)


def meta_folder_of(model, folder, params):
    """What Meta's download holds for the same weights: consolidated.00.pth and params.json,
    queries and keys in Meta's interleaved order."""
    import torch

    from formats.hf import our_rows
    from models import NAMES

    config = model.config
    heads = {"n_heads": config.num_attention_heads, "n_kv_heads": config.num_key_value_heads}
    sd = {}
    for hf_name, tensor in model.state_dict().items():
        name = NAMES.rename(hf_name, "hf", "ours")
        if name is None or (name == "output.weight" and config.tie_word_embeddings):
            continue
        sd[name] = torch.from_numpy(np.array(our_rows(mx.array(tensor.numpy()), NAMES.weight(name), heads)))
    os.makedirs(folder, exist_ok=True)
    torch.save(sd, os.path.join(folder, "consolidated.00.pth"))
    with open(os.path.join(folder, "params.json"), "w") as f:
        json.dump(params, f)


def test_meta_llama3_folder_with_scaled_rope_and_tiktoken(tmp_path):
    """Meta's Llama 3.1 layout: use_scaled_rope (factor 8 over 8192 positions), rope_theta, and a
    tiktoken tokenizer.model whose specials follow its ranks."""
    n_ranks = tiktoken_file(tmp_path / "ranks")
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    reference = make_hf_model(tmp_path / "hf", "llama", vocab_size=n_ranks + 256, rope_theta=500000.0,
                              rope_scaling=dict(rope))  # transformers writes into the dict it gets
    meta_folder_of(reference, tmp_path / "meta", {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                                  "vocab_size": n_ranks + 256, "multiple_of": 32,
                                                  "ffn_dim_multiplier": 0.75, "norm_eps": 1e-5,
                                                  "rope_theta": 500000.0, "use_scaled_rope": True})
    shutil.copyfile(tmp_path / "ranks", tmp_path / "meta" / "tokenizer.model")
    model, tokenizer, config = converted(tmp_path / "meta", tmp_path / "mlx")
    assert config["rope_scaling"] == rope and config["rope_theta"] == 500000.0
    tokens = TOKENS % (n_ranks + 256)
    assert np.abs(mlx_logits(model, tokens) - hf_logits(reference, tokens)).max() <= 1e-4
    # The tokenizer: BOS first, the specials in text, three ends of a turn.
    begin, end, eom, eot = (n_ranks + i for i in (0, 1, 8, 9))
    assert config["eos_token_ids"] == [end, eom, eot] and tokenizer.eos_ids == {end, eom, eot}
    ids = tokenizer.encode("<|start_header_id|>user<|end_header_id|>the")
    assert ids[0] == begin and ids[1] == n_ranks + 6 and ids[-1] == 256 + 2  # "the" is one merged token
    assert tokenizer.decode(ids[1:]) == "<|start_header_id|>user<|end_header_id|>the"
