"""Hostile input, round 2: every reader bounded, and nothing converted that cannot load.

Each case ends in one UserError naming the file and key (or exit 2 with one error line and
nothing written), fast and without allocating what the file asks for; property tests draw
JSON, YAML and safetensors bytes and check that nothing else can happen.
"""

import json
import os
import shutil
import struct
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lora
import settings as cli_settings
import utils
from formats.safetensors import SafetensorsFile
from hf_checkpoints import make_hf_model
from utils import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROPERTY = settings(max_examples=200, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# ----------------------------------------------------------------------------- JSON

@pytest.mark.parametrize("text, message", [
    ("[" * 100_000 + "]" * 100_000, "nested"),
    ('{"a": ' * 150 + "1" + "}" * 150, "nested more than 100 deep"),
    ('{"dim": ' + "9" * 5000 + "}", "an integer of 5000 digits"),
    ('{"dim": -' + "9" * 41 + "}", "an integer of 41 digits"),
    ('{"dim": 64, "dim": 65}', "the key 'dim' appears twice"),
    ('{"name": "\\ud800"}', "not valid Unicode"),
    (b'{"a": "\xff"}', "not UTF-8"),
    ('{"dim": 64,', "invalid JSON"),
])
def test_json_bombs_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    started = time.monotonic()
    with pytest.raises(UserError, match=message) as error:
        utils.read_json(str(path), "model configuration")
    assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)
    assert time.monotonic() - started < 10


def test_a_data_line_bomb_names_its_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "fine"}\n' + '{"text": ' + "[" * 5000 + "]" * 5000 + "}\n")
    with pytest.raises(UserError, match=r"train.jsonl: line 2: JSON nested"):
        list(utils.read_jsonl(str(path)))


@PROPERTY
@given(st.one_of(st.binary(max_size=300),
                 st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                              lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                                         max_size=4),
                              max_leaves=30).map(lambda v: json.dumps(v).encode())))
def test_any_bytes_parse_as_json_or_fail_in_one_line(raw):
    try:
        utils.parse_json(raw, "x.json")
    except UserError as e:
        assert str(e).startswith("x.json: ") and "\n" not in str(e)


# ----------------------------------------------------------------------------- YAML

def alias_bomb(levels=9):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text, message", [
    (alias_bomb(), "more than 10000 values once its aliases are expanded"),
    ("lora_targets: " + "[" * 3000 + "]" * 3000 + "\n", "nested"),
    ("iters: 3\nbatch_size: 2\niters: 4\n", "the key 'iters' appears twice"),
    ("iters: " + "9" * 5000 + "\n", "unreadable value"),
    ("iters: [1, 2\n", "invalid YAML"),
])
def test_yaml_bombs_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    started = time.monotonic()
    with pytest.raises(UserError, match=message) as error:
        cli_settings.read_config(lora.LoraSettings, str(path))
    assert str(error.value).startswith(str(path)) and len(str(error.value)) < 500
    assert time.monotonic() - started < 10


def test_an_alias_bomb_on_the_command_line_is_one_short_line(tmp_path):
    (tmp_path / "c.yaml").write_text(alias_bomb())
    run = subprocess.run([sys.executable, os.path.join(ROOT, "lora.py"), "--config", str(tmp_path / "c.yaml"),
                          "--test"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and len(run.stderr) < 500 and run.stderr.count("\n") == 1, run.stderr[:1000]


@PROPERTY
@given(st.text(alphabet="ab: -[]{}&*,'\"\n0123456789.!|>#%@", max_size=120))
def test_any_yaml_reads_or_fails_in_one_line(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    try:
        cli_settings.read_config(lora.LoraSettings, str(path))
    except UserError as e:
        assert str(e).startswith(str(path)) and "\n" not in str(e)


# ----------------------------------------------------------------------------- safetensors

def safetensors_bytes(header, data=b""):
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize("header, message", [
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
     b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', "the key 'a' appears twice"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, "b overlaps the bytes of a"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, "overlaps"),
    ({"a": {"dtype": "F32", "shape": [10**40], "data_offsets": [0, 8]}}, "an integer of 41 digits"),
    ({"a": {"dtype": "F32", "shape": [10**12, 10**12], "data_offsets": [0, 8]}}, "8 bytes of data for"),
    (b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested"),
])
def test_forged_safetensors_headers_are_refused(tmp_path, header, message):
    path = tmp_path / "model.safetensors"
    path.write_bytes(safetensors_bytes(header, bytes(16)))
    with pytest.raises(UserError, match=message):
        SafetensorsFile(str(path))


@PROPERTY
@given(st.binary(max_size=200), st.integers(0, 2**64 - 1))
def test_any_safetensors_bytes_open_or_fail_in_one_line(tmp_path, raw, length):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", length % (len(raw) + 2)) + raw)
    try:
        SafetensorsFile(str(path))
    except UserError as e:
        assert str(e).startswith(str(path)) and "\n" not in str(e)


# ----------------------------------------------------------------------------- config.json at conversion

@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "model"
    make_hf_model(str(folder))
    return folder


@pytest.mark.parametrize("key, value, message", [
    ("num_hidden_layers", 1_000_000_000, "'n_layers' must be from 1 to 1024"),
    ("rms_norm_eps", float("nan"), "'norm_eps' must be from"),
    ("rms_norm_eps", float("inf"), "'norm_eps' must be from"),
    ("rope_theta", 0.5, "'rope_theta' must be from"),
    ("max_position_embeddings", 1e30, "'max_position_embeddings' must be a positive integer"),
    ("rope_scaling", {"rope_type": "linear", "factor": "abc"}, "'rope_scaling.factor' must be a number"),
    ("tie_word_embeddings", "false", "'tie_word_embeddings' must be true or false"),
    ("vocab_size", 2**40, "'vocab_size' must be from"),
])
def test_a_config_that_would_not_load_is_refused_before_anything_is_written(hf_folder, tmp_path, key, value,
                                                                             message):
    source = tmp_path / "source"
    shutil.copytree(hf_folder, source)
    config = json.loads((source / "config.json").read_text())
    config[key] = value
    if key == "rope_theta" and "rope_theta" in config.get("rope_parameters", {}):  # transformers 5's place
        config["rope_parameters"]["rope_theta"] = value
    (source / "config.json").write_text(json.dumps(config))
    started = time.monotonic()
    run = subprocess.run([sys.executable, os.path.join(ROOT, "convert.py"), "--hf-path", str(source),
                          "--mlx-path", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr.splitlines()[-1].startswith(f"error: {source / 'config.json'}"), run.stderr
    assert message in run.stderr, run.stderr
    assert not (tmp_path / "out").exists() and sorted(os.listdir(tmp_path)) == ["source"]
    assert time.monotonic() - started < 60
