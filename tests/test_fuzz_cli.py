"""Every command line under hostile values: exit 0 or 2, never a traceback or a crash, one error
line, and nothing left in the output folder by a run that fails.

Each example starts the real script in a subprocess (a C++ abort must show as a crash, not
kill the test run) with a small valid command line, and sets one flag to a value drawn from
a hostile set: negative, zero, NaN, infinite, huge, empty, of the wrong type, not UTF-8, a
lone surrogate, a path that is a device or a folder. The value comes on the command line or
through a --config YAML file, which can also carry lists, mappings, booleans and null.
"""

import contextlib
import json
import math
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import settings as cli_settings
from checkpoints import make_checkpoint
from helpers import FAKEPKG, write_dataset, write_package

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# CI draws the same 16 examples a command every run; MLX_LORA_FUZZ_EXAMPLES=200 and
# MLX_LORA_FUZZ_RANDOM=1 search further.
FUZZ = settings(max_examples=int(os.environ.get("MLX_LORA_FUZZ_EXAMPLES", 16)), deadline=None,
                derandomize=not os.environ.get("MLX_LORA_FUZZ_RANDOM"),
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

SETTINGS = {"lora.py": __import__("lora").LoraSettings, "convert.py": __import__("convert").ConvertSettings,
            "pretrain.py": __import__("pretrain").PretrainSettings,
            "cwk_create_dataset.py": __import__("cwk_create_dataset").DatasetSettings}
HOSTILE_ARGS = ["-1", "0", "nan", "inf", "-inf", "1e308", "1" + "0" * 30, "", " ", "abc", "1.5",
                b"\xff\xfe", "\udcff", "\U0001f4a5", "/dev/null", ".", "/nonexistent/dir/x.npz"]
HOSTILE_YAML = [-1, 0, math.nan, math.inf, 10**30, "", "abc", 1.5, [1, 2], {"a": 1}, True, None, "\ud800",
                "x" * 5000]


def yaml_text(key, value):
    """One YAML line setting `key`: JSON is YAML's flow style, but for NaN and infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{key}: {'.nan' if math.isnan(value) else '.inf'}\n"
    return f"{key}: {json.dumps(value)}\n"


def flags_of(cls):
    return [cli_settings.flag(f) for f in cli_settings.dataclasses.fields(cls)]


@st.composite
def hostile(draw, flags):
    """(flag, how, value): one flag of `flags` set to a hostile value on the command line or in YAML."""
    flag = draw(st.sampled_from(flags))
    how = draw(st.sampled_from(["args", "yaml"]))
    return flag, how, draw(st.sampled_from(HOSTILE_ARGS if how == "args" else HOSTILE_YAML))


def run_hostile(script, base, change, out, tmp, did_its_job, env=None):
    """Run `script` with `base` (a {flag: value or None} of a valid run) and one hostile change;
    check what a user sees and what is left in `out`. A run that accepts the value (exit 0) must
    have done what its settings, parsed here from the same arguments, ask: `did_its_job(settings,
    stdout, stderr, tmp)` says what is missing, so a value silently ignored or misread fails."""
    flag, how, value = change
    argv = dict(base)
    argv.pop(flag, None)
    args = [a for f, v in argv.items() for a in ([f] if v is None else [f, v])]
    if how == "args":
        args += [flag, os.fsdecode(value)]
    else:
        (tmp / "c.yaml").write_text(yaml_text(flag[2:], value), encoding="utf-8", errors="surrogatepass")
        args += ["--config", str(tmp / "c.yaml")]
    before = sorted(os.listdir(out))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, timeout=600,
                          cwd=tmp, env=env)
    stderr = proc.stderr.decode("utf-8", "replace")
    where = f"{script} {flag} {value!r} ({how}): exit {proc.returncode}\n{stderr[-3000:]}"
    assert proc.returncode in (0, 2), where  # a negative code is a signal: a crash
    assert "Traceback" not in stderr and "Fatal Python error" not in stderr, where
    left = sorted(os.listdir(out))
    if proc.returncode == 2:
        errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and stderr.strip().splitlines()[-1] == errors[0], where
        assert left == before, f"{where}\nleft behind: {sorted(set(left) - set(before))}"
    else:
        assert not [name for name in left if name.startswith(".")], f"{where}\ntemporaries: {left}"
        with contextlib.chdir(tmp):
            parsed = cli_settings.parse(SETTINGS[script], args, "")
        missing = did_its_job(parsed, proc.stdout.decode("utf-8", "replace"), stderr, tmp)
        assert not missing, f"{where}\nexit 0, but {missing}"


def fresh(tmp_path_factory, name):
    tmp = tmp_path_factory.mktemp(name)
    (tmp / "out").mkdir()
    return tmp, tmp / "out"


# ----------------------------------------------------------------------------- the commands

@pytest.fixture(scope="module")
def lora_inputs(tiny_llama, tmp_path_factory):
    return tiny_llama[0], write_dataset(tmp_path_factory.mktemp("fuzz") / "data", n_train=6, n_valid=2, n_test=2)


@FUZZ
@given(change=hostile(flags_of(SETTINGS["lora.py"])))
def test_lora_command_line(lora_inputs, tmp_path_factory, change):
    model, data = lora_inputs
    tmp, out = fresh(tmp_path_factory, "lora")
    base = {"--model": model, "--data": data, "--adapter-file": str(out / "a.npz"), "--train": None, "--test": None,
            "--prompt": "hi", "-n": "2", "--iters": "2", "--steps-per-eval": "2", "--val-batches": "1",
            "--test-batches": "1", "--lora-layers": "1", "--batch-size": "2"}
    run_hostile("lora.py", base, change, out, tmp, lora_did_its_job)


def lora_did_its_job(parsed, stdout, stderr, tmp):
    if parsed.train and not (tmp / parsed.adapter_file).is_file():
        return f"no adapters at {parsed.adapter_file}"
    if parsed.test and "Test loss" not in stdout:
        return "no test loss printed"
    if parsed.prompt is not None and "generation:" not in stderr:  # the decode loop's report, after it ran
        return "no generation reported"
    return None


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    src = tmp_path_factory.mktemp("fuzz") / "torch"
    make_checkpoint(src, n_layers=1, seed=1)
    return str(src)


@FUZZ
@given(change=hostile(flags_of(SETTINGS["convert.py"])))
def test_convert_command_line(checkpoint, tmp_path_factory, change):
    tmp, out = fresh(tmp_path_factory, "convert")
    base = {"--torch-path": checkpoint, "--mlx-path": str(out / "model"), "-q": None, "--q-group-size": "32"}
    run_hostile("convert.py", base, change, out, tmp, lambda parsed, stdout, stderr, tmp: wrote(
        tmp / parsed.mlx_path / "config.json"))


def wrote(path):
    return None if path.is_file() else f"no {path}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("fuzz") / "corpus", n_train=40, n_valid=4, n_test=1)


@FUZZ
@given(change=hostile(flags_of(SETTINGS["pretrain.py"])))
def test_pretrain_command_line(corpus, tmp_path_factory, change):
    tmp, out = fresh(tmp_path_factory, "pretrain")
    base = {"--corpus": corpus, "--out": str(out / "model"), "--iters": "2", "--batch-size": "2", "--context": "16",
            "--dim": "32", "--n-layers": "1", "--n-heads": "2", "--n-kv-heads": "1", "--hidden-dim": "64",
            "--vocab-size": "300", "--steps-per-eval": "2", "--val-batches": "1", "--save-every": "2",
            "--warmup": "1"}
    run_hostile("pretrain.py", base, change, out, tmp, lambda parsed, stdout, stderr, tmp: wrote(
        tmp / parsed.out / "config.json"))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    write_package(root, "fakepkg", FAKEPKG)
    return root


@FUZZ
@given(change=hostile(flags_of(SETTINGS["cwk_create_dataset.py"])))
def test_dataset_command_line(site, tmp_path_factory, change):
    tmp, out = fresh(tmp_path_factory, "dataset")
    base = {"--packages": "fakepkg", "--out": str(out / "data"), "--workers": "1", "--import-timeout": "20"}
    run_hostile("cwk_create_dataset.py", base, change, out, tmp, lambda parsed, stdout, stderr, tmp: wrote(
        tmp / parsed.out / "train.jsonl"), env=dict(os.environ, PYTHONPATH=str(site)))
