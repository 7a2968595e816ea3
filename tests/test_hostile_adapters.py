"""Hostile adapters and tokenizers: PEFT folders (adapter_config.json and its safetensors) and this
toolkit's adapter .json with wrong values, repeated targets on the command line, each a one-line
error naming the file and the key; and a tokenizer with fewer pieces than its model's vocabulary,
whose missing ids decode as nothing instead of ending generation in an IndexError."""

import base64
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

import adapters
import generate
import loading
import models
from formats import peft
from helpers import LORA
from tokenizer import load_tokenizer
from utils import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUSE = os.path.join(ROOT, "fuse.py")
ADAPTED = models.AdapterConfig(layers=2, targets=("wq", "wv"), rank=4, alpha=8.0)
# One of the tensors the PEFT folder holds: layer 1's lora_B of q_proj, [out, r] = [64, 4].
Q_B = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
Q_B_OF_LAYER_2, K_B = Q_B.replace("layers.1", "layers.2"), Q_B.replace("q_proj", "k_proj")


@pytest.fixture(scope="module")
def adapted(tiny_llama, tmp_path_factory):
    """LoRA on wq and wv of tiny_llama's two layers, rank 4, B not zero so that a reordering shows:
    the model folder and its config, the adapters in our layout (`arrays`), as a PEFT folder and
    as our adapter file."""
    model, _, _ = loading.load_model(tiny_llama[0])
    models.apply_lora(model, ADAPTED)
    mx.random.seed(3)
    arrays = {k: mx.random.normal(v.shape) for k, v in tree_flatten(model.trainable_parameters())}
    model.update(tree_unflatten(list(arrays.items())))
    root = tmp_path_factory.mktemp("adapters")
    os.mkdir(root / "peft")
    peft.write(str(root / "peft"), ADAPTED, arrays, vars(model.args), "tiny")
    adapters.save(model, str(root / "a.npz"), ADAPTED)
    return SimpleNamespace(model_dir=tiny_llama[0], model_config=vars(model.args), arrays=arrays,
                           peft=str(root / "peft"), adapter_file=str(root / "a.npz"))


def peft_copy(adapted, tmp_path, **changes):
    """A copy of the PEFT folder, its configuration edited."""
    folder = str(tmp_path / "peft")
    shutil.copytree(adapted.peft, folder)
    return edit_config(folder, **changes)


def edit_config(folder, **changes):
    """`folder` with `changes` to its adapter_config.json (None: the key removed)."""
    path = os.path.join(folder, peft.CONFIG)
    config = dict(json.loads(open(path).read()), **changes)
    with open(path, "w") as f:
        json.dump({k: v for k, v in config.items() if v is not None}, f)
    return folder


def one_line_error(call, *expected):
    """The UserError `call` raises: one line, holding each of `expected`."""
    with pytest.raises(UserError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message, message
    assert all(text in message for text in expected), (message, expected)
    return message


def load_error(adapted, adapter_file, *expected):
    """The one-line UserError of loading the model with `adapter_file`, holding each of `expected`."""
    return one_line_error(lambda: loading.load_model(adapted.model_dir, adapter_file=adapter_file), *expected)


def assert_one_line_error(proc, *expected):
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(text in last for text in expected), (proc.stderr, expected)


def run(script, *args):
    return subprocess.run([sys.executable, script, *map(str, args)], capture_output=True, text=True, timeout=300)


# ----------------------------------------------------------------------------- adapter_config.json

@pytest.mark.parametrize("key, value, message", [
    ("target_modules", [["q_proj"]], "cannot map the modules ['q_proj']"),
    ("target_modules", ["q_proj", 7], "cannot map the modules 7"),
    ("target_modules", ["q_proj", "q_proj"], "names 'q_proj' twice"),
    ("target_modules", ["v_proj", "q_proj", "v_proj"], "names 'v_proj' twice"),
    ("target_modules", "q_proj", "must be a list of module names"),
    ("target_modules", [], "must be a list of module names"),
    ("lora_dropout", "abc", "must be a number, got 'abc'"),
    ("lora_dropout", 1.5, "must be from 0.0 to 0.999"),
    ("lora_dropout", True, "must be a number, got True"),
    ("layers_to_transform", [1, "x"], "'layers_to_transform'[1] must be an integer, got 'x'"),
    ("layers_to_transform", [True, 1], "'layers_to_transform'[0] must be an integer, got True"),
    ("layers_to_transform", [0.0, 1], "'layers_to_transform'[0] must be an integer, got 0.0"),
    ("layers_to_transform", [0, -1], "'layers_to_transform'[1] must be from 0 to 1, got -1"),
    ("layers_to_transform", [10**30], "'layers_to_transform'[0] must be from 0 to 1"),
    ("layers_to_transform", [1, 1], "'layers_to_transform' names layer 1 twice"),
    ("layers_to_transform", [0], "only the last N layers"),
    ("layers_to_transform", [], "'layers_to_transform' is empty"),
    ("layers_to_transform", "1", "'layers_to_transform' must be an integer, got '1'"),
    ("layers_to_transform", 2, "'layers_to_transform' must be from 0 to 1, got 2"),
    ("r", 4.0, "'r' must be an integer, got 4.0"),
    ("r", True, "'r' must be an integer, got True"),
    ("r", 0, "'r' must be from 1"),
    ("lora_alpha", -1e6, "'lora_alpha' must be from 1e-12"),
    ("lora_alpha", 0, "'lora_alpha' must be from 1e-12"),
    ("lora_alpha", math.inf, "'lora_alpha' must be from 1e-12"),
    ("lora_alpha", "16", "'lora_alpha' must be a number, got '16'"),
    ("use_dora", "yes", "'use_dora' must be true or false, got 'yes'"),
    ("use_rslora", "no", "'use_rslora' must be true or false, got 'no'"),
    ("use_rslora", 1, "'use_rslora' must be true or false, got 1"),
    ("fan_in_fan_out", "no", "'fan_in_fan_out': 'no' is not supported"),
    ("bias", ["none"], "'bias': ['none'] is not supported"),
    ("peft_type", "LOHA", "'peft_type': 'LOHA' is not supported"),
    ("rank_pattern", {"q_proj": 8}, "'rank_pattern': per-module ranks"),
    ("modules_to_save", "lm_head", "'modules_to_save': per-module ranks"),
])
def test_a_peft_configuration_value_of_the_wrong_type_or_range_is_one_line_naming_the_key(
        adapted, tmp_path, key, value, message):
    folder = peft_copy(adapted, tmp_path, **{key: value})
    load_error(adapted, folder, os.path.join(folder, peft.CONFIG), f"'{key}'", message)


def test_a_peft_configuration_without_r_names_it(adapted, tmp_path):
    folder = peft_copy(adapted, tmp_path, r=None)
    load_error(adapted, folder, os.path.join(folder, peft.CONFIG), "'r' must be an integer, got None")


@pytest.mark.parametrize("script", [LORA, FUSE])
def test_the_scripts_report_a_bad_peft_configuration_in_one_line(adapted, tmp_path, script):
    folder = peft_copy(adapted, tmp_path, use_rslora="no")
    out = ["--prompt", "hi", "-n", 2] if script == LORA else ["--save-path", tmp_path / "fused"]
    assert_one_line_error(run(script, "--model", adapted.model_dir, "--adapter-file", folder, *out),
                          os.path.join(folder, peft.CONFIG), "'use_rslora' must be true or false")
    assert not os.path.exists(tmp_path / "fused")


# ----------------------------------------------------------------------------- adapter_model.safetensors

def rewrite_weights(folder, change):
    path = os.path.join(folder, peft.WEIGHTS)
    tensors = dict(mx.load(path))
    change(tensors)
    mx.save_safetensors(path, tensors)


@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop(Q_B), f"missing {Q_B}"),
    (lambda t: t.update({Q_B_OF_LAYER_2: t[Q_B]}), f"unexpected {Q_B_OF_LAYER_2}"),
    (lambda t: t.update({K_B: t[Q_B]}), f"unexpected {K_B}"),
    (lambda t: t.update({Q_B: mx.zeros((65, 4))}), f"{Q_B} has shape (65, 4), the model expects (64, 4)"),
    (lambda t: t.update({Q_B: mx.zeros((64,))}), f"{Q_B} has shape (64,), the model expects (64, 4)"),
    (lambda t: t.update({Q_B: mx.zeros((64, 4, 1))}), f"{Q_B} has shape (64, 4, 1)"),
    (lambda t: t.update({Q_B: mx.zeros((64, 4), dtype=mx.int32)}), f"{Q_B}: dtype 'I32' is not a weight type"),
])
def test_peft_tensors_that_do_not_fit_their_configuration_are_one_line_naming_them(adapted, tmp_path, change, message):
    folder = peft_copy(adapted, tmp_path)
    rewrite_weights(folder, change)
    load_error(adapted, folder, os.path.join(folder, peft.WEIGHTS), message)


@pytest.mark.parametrize("changes, message", [
    ({"r": 8}, "layers.0.self_attn.q_proj.lora_A.weight has shape (4, 64), the model expects (8, 64)"),
    ({"use_dora": True}, "missing base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"),
    ({"target_modules": ["q_proj"]}, "unexpected base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"),
    ({"layers_to_transform": 1}, "unexpected base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),
])
def test_a_configuration_the_tensors_do_not_follow_is_one_line(adapted, tmp_path, changes, message):
    folder = peft_copy(adapted, tmp_path, **changes)
    load_error(adapted, folder, os.path.join(folder, peft.WEIGHTS), message)


def test_non_finite_peft_tensors_are_refused(adapted, tmp_path):
    folder = peft_copy(adapted, tmp_path)
    rewrite_weights(folder, lambda t: t.update({Q_B: t[Q_B] * mx.nan}))
    load_error(adapted, folder, folder, "layers.1.attention.wq.lora_b is not finite")


# ----------------------------------------------------------------------------- valid PEFT folders

def read_back(adapted, folder):
    """The AdapterConfig and arrays read from `folder`, after checking the model loads with them."""
    loading.load_model(adapted.model_dir, adapter_file=folder)
    return adapters.read(folder, adapted.model_config)


def assert_same_arrays(got, expected):
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(np.array(got[name]), np.array(expected[name]), err_msg=name)


@pytest.mark.parametrize("changes", [
    {}, {"layers_to_transform": None}, {"layers_to_transform": [1, 0]}, {"lora_dropout": None},
    {"use_dora": None, "use_rslora": None, "bias": None, "fan_in_fan_out": None, "peft_type": None},
    {"rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None}, {"lora_alpha": 8}, {"lora_dropout": 0.05},
])
def test_valid_peft_folders_still_load(adapted, tmp_path, changes):
    config, arrays = read_back(adapted, peft_copy(adapted, tmp_path, **changes))
    assert (config.layers, config.targets, config.rank, config.alpha) == (2, ("wq", "wv"), 4, 8.0)
    assert_same_arrays(arrays, adapted.arrays)


def test_rslora_scales_alpha_by_the_square_root_of_the_rank(adapted, tmp_path):
    folder = peft_copy(adapted, tmp_path, use_rslora=True)
    model, _, _ = loading.load_model(adapted.model_dir, adapter_file=folder)
    assert model.layers[1].attention.wq.scale == pytest.approx(8.0 / math.sqrt(4))  # PEFT's alpha / sqrt(r)


def test_one_layer_as_a_bare_index_loads(adapted, tmp_path):
    """PEFT writes layers_to_transform as one index as well as a list."""
    last = {k: v for k, v in adapted.arrays.items() if k.startswith("layers.1.")}
    folder = str(tmp_path / "one")
    os.mkdir(folder)
    peft.write(folder, dataclasses.replace(ADAPTED, layers=1), last, adapted.model_config, "tiny")
    config, arrays = read_back(adapted, edit_config(folder, layers_to_transform=1))
    assert config.layers == 1
    assert_same_arrays(arrays, last)


# ----------------------------------------------------------------------------- repeated targets

@pytest.mark.parametrize("targets", ["wq,wq", "wv,wq,wv", " w1 , w1 "])
def test_repeated_lora_targets_on_the_command_line_are_refused(targets):
    name = targets.split(",")[-1].strip()
    one_line_error(lambda: models.parse_targets(targets), "--lora-targets", f"{name} is given twice")


def test_repeated_lora_targets_end_the_script_in_one_line(tiny_llama):
    assert_one_line_error(run(LORA, "--model", tiny_llama[0], "--prompt", "hi", "--lora-targets", "wq,wq"),
                          "--lora-targets: wq is given twice")


@pytest.mark.parametrize("change, message", [
    ({"targets": ["wq", "wq"]}, "'targets' names 'wq' twice"),
    ({"targets": ["wv", "wq", "wv"]}, "'targets' names 'wv' twice"),
    ({"rank": 4.5}, "'rank' must be an integer, got 4.5"),
    ({"alpha": -1.0}, "'alpha' must be from 1e-12"),
    ({"dropout": "0.1"}, "'dropout' must be a number, got '0.1'"),
])
def test_adapter_json_values_are_one_line_naming_the_key(adapted, tmp_path, change, message):
    adapter_file = str(tmp_path / "a.npz")
    shutil.copy(adapted.adapter_file, adapter_file)
    config = json.loads(open(adapters.config_path(adapted.adapter_file)).read())
    with open(adapters.config_path(adapter_file), "w") as f:
        json.dump(dict(config, **change), f)
    load_error(adapted, adapter_file, adapters.config_path(adapter_file), message)


# ----------------------------------------------------------------------------- tokenizers short of the model

def padded_vocabulary(model_dir, folder):
    """A copy of `model_dir` whose vocabulary has 2 * dim rows more than its tokenizer's pieces
    (as a vocabulary padded for speed): their output rows, 1000 times each unit vector and its
    opposite, outscore every piece for any hidden state, so greedy decoding draws only ids the
    tokenizer lacks."""
    shutil.copytree(model_dir, folder)
    weights = dict(mx.load(os.path.join(folder, "weights.npz")))
    vocab, dim = weights["output.weight"].shape
    eye = 1000 * mx.eye(dim)
    weights["output.weight"] = mx.concatenate([weights["output.weight"], eye, -eye])
    weights["tok_embeddings.weight"] = mx.concatenate([weights["tok_embeddings.weight"], mx.zeros((2 * dim, dim))])
    mx.eval(weights)  # read before the file is replaced
    mx.savez(os.path.join(folder, "weights.npz"), **weights)
    config = json.loads(open(os.path.join(folder, "config.json")).read())
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(config, vocab_size=vocab + 2 * dim), f)
    return str(folder)


def test_generation_that_draws_ids_past_the_tokenizer_prints_nothing_for_them(tiny_llama, tmp_path):
    folder = padded_vocabulary(tiny_llama[0], tmp_path / "padded")
    model, tokenizer, _ = loading.load_model(folder, generation_only=True)
    prompt = tokenizer.encode("Once upon a time")
    tokens = generate.generate_tokens(model, prompt)
    assert all(next(tokens) >= tokenizer.vocab_size for _ in range(4))  # the ids this test is about
    assert "".join(generate.stream_text(model, tokenizer, prompt, max_tokens=4)) == ""
    proc = run(LORA, "--model", folder, "--prompt", "Once upon a time", "-n", 4)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout.strip() == "Once upon a time"


def tiktoken_folder(folder):
    """A Llama 3 tokenizer.model of the 256 bytes alone."""
    os.makedirs(folder)
    with open(os.path.join(folder, "tokenizer.model"), "w") as f:
        f.writelines(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256))


def tokenizer_json_folder(folder):
    """A tokenizer.json of three words."""
    from tokenizers import Tokenizer, models as tokenizer_models, pre_tokenizers

    tokenizer = Tokenizer(tokenizer_models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    os.makedirs(folder)
    tokenizer.save(os.path.join(folder, "tokenizer.json"))


@pytest.mark.parametrize("kind", ["sentencepiece", "tiktoken", "tokenizer.json"])
def test_every_tokenizer_decodes_ids_it_lacks_as_nothing(tiny_llama, tmp_path, kind):
    folder = str(tmp_path / "tok")
    if kind == "sentencepiece":
        shutil.copytree(tiny_llama[0], folder)
    else:
        (tiktoken_folder if kind == "tiktoken" else tokenizer_json_folder)(folder)
    tokenizer = load_tokenizer(folder)
    ids = tokenizer.encode("hello world", bos=False)
    n = tokenizer.vocab_size
    assert tokenizer.decode([n, *ids[:1], n + 1, *ids[1:], 10**9]) == tokenizer.decode(ids) != ""
    detokenizer = generate.StreamingDetokenizer(tokenizer, ids)
    assert detokenizer.add(n) == "" and detokenizer.flush() == ""
