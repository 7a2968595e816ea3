"""Hostile and clumsy input, case by case: each a one-line error (or a stated limit), exit 2,
and nothing left behind. The property tests over every command line are in test_fuzz_cli.py."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

import mlx.core as mx

import generate
import loading
import utils
from checkpoints import make_checkpoint
from helpers import LORA, write_dataset
from utils import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERT = os.path.join(ROOT, "convert.py")
FUSE = os.path.join(ROOT, "fuse.py")


def run(script, *args, **kwargs):
    return subprocess.run([sys.executable, script, *map(str, args)], capture_output=True, text=True, timeout=300,
                          **kwargs)


def assert_one_line_error(proc, *expected):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0], proc.stderr
    for text in expected:
        assert text in errors[0], (text, errors[0])


def train_args(model_dir, data, adapter_file, *extra):
    return [LORA, "--model", model_dir, "--train", "--data", data, "--adapter-file", adapter_file, "--iters", 4,
            "--steps-per-eval", 4, "--lora-layers", 2, *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("hostile") / "data")


# ----------------------------------------------------------------------------- the seven cases

@pytest.mark.parametrize("name", ["adapters", "adapters.bin"])
def test_adapter_file_needs_a_weights_extension_before_anything_runs(tiny_llama, data, tmp_path, name):
    """Once, --adapter-file out/adapters exited 0 and wrote a 0-byte file; the data sat in a temporary."""
    proc = run(*train_args(tiny_llama[0], data, tmp_path / "out" / name))
    assert_one_line_error(proc, f"--adapter-file {tmp_path / 'out' / name}", "must end in .npz or .safetensors")
    assert not os.path.exists(tmp_path / "out")  # nothing made, not even the folder
    assert "Loading model" not in proc.stderr


def test_a_prompt_beyond_memory_is_refused_and_a_long_one_runs_in_chunks(tiny_llama):
    """A 50,000-character prompt (22,501 tokens) once grew until the kernel killed the process
    at 24 GB: the prompt's attention was prompt x prompt. Now the prompt runs in chunks
    through the cache, and what cannot fit is refused before anything is allocated."""
    model, tokenizer, _ = loading.load_model(tiny_llama[0], generation_only=True)
    prompt = tokenizer.encode("the cat sat on the mat. " * 480)
    assert len(prompt) > 8000
    mx.reset_peak_memory()
    text = "".join(generate.stream_text(model, tokenizer, prompt, max_tokens=3))
    assert isinstance(text, str)
    # Whole, the prompt's scores and probabilities would take 2 x 4 heads x 8,000^2 floats
    # (2 GB); a chunk's take 2 x 4 x 512 x 8,000 (0.13 GB).
    assert mx.get_peak_memory() < 0.5e9, mx.get_peak_memory()
    with pytest.raises(UserError, match=r"need about .* GiB for the KV cache and attention, more than"):
        next(generate.stream_text(model, tokenizer, prompt, max_tokens=10**12))


def test_a_prompt_beyond_the_models_context_is_refused_or_cut(tiny_llama, tmp_path, capsys):
    shutil.copytree(tiny_llama[0], tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps(dict(config, context_length=64)))
    model, tokenizer, _ = loading.load_model(str(tmp_path / "m"), generation_only=True)
    with pytest.raises(UserError, match="the prompt is 80 tokens, the model's context only 64"):
        next(generate.stream_text(model, tokenizer, list(range(1, 81)), max_tokens=5))
    pieces = list(generate.stream_text(model, tokenizer, list(range(1, 61)), max_tokens=50))
    assert len(pieces) <= 4 + 1  # 4 tokens up to the context, then the flush
    assert "generating at most 4 tokens, up to the model's context of 64" in capsys.readouterr().err


def test_resume_from_a_checkpoint_past_iters_is_refused(tiny_llama, data, tmp_path):
    """Once, this printed "Saved adapters" and wrote none."""
    adapter_file = tmp_path / "a.npz"
    assert run(*train_args(tiny_llama[0], data, adapter_file, "--save-every", 2)).returncode == 0
    before = adapter_file.read_bytes()
    proc = run(*train_args(tiny_llama[0], data, adapter_file, "--iters", 3, "--resume", "latest"))
    assert_one_line_error(proc, "step-00000004.safetensors: checkpoint is at step 4, and --iters is 3")
    assert adapter_file.read_bytes() == before and "Loading model" not in proc.stderr


@pytest.mark.parametrize("flag, value, message", [
    ("--lora-alpha", "nan", "--lora-alpha must be a finite number, got nan"),
    ("--learning-rate", "nan", "--learning-rate must be a finite number, got nan"),
    ("--learning-rate", "-1", "--learning-rate must be above 0, got -1.0"),
    ("--lora-dropout", "inf", "--lora-dropout must be a finite number, got inf"),
])
def test_non_finite_or_negative_training_flags_are_refused(tiny_llama, data, tmp_path, flag, value, message):
    """Once, alpha NaN trained with every step skipped and exited 0; a learning rate of NaN
    failed at the first checkpoint; -1 trained uphill."""
    proc = run(*train_args(tiny_llama[0], data, tmp_path / "a.npz", flag, value))
    assert_one_line_error(proc, message)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("change, message", [
    ({"dim": "320"}, "'dim' must be an integer, got '320'"),
    ({"n_kv_heads": 0}, "'n_kv_heads' must be from 1 to 4096, got 0"),
    ({"head_dim": -8}, "'head_dim' must be from 1 to 4096, got -8"),
    ({"norm_eps": float("nan")}, "'norm_eps' must be from"),
    ({"vocab_size": 2**40}, "'vocab_size' must be from 1 to 4194304"),
    ({"quantization": {"group_size": 64}}, "'quantization' has no 'bits'"),
    ({"quantization": {"group_size": 64, "bits": 7}}, "'quantization.bits' must be one of 2, 3, 4, 5, 6, 8"),
    ({"quantization": "4bit"}, "'quantization' must be an object"),
])
def test_bad_model_config_values_are_one_line_errors(tiny_llama, tmp_path, change, message):
    """Once, "dim": "320", "n_kv_heads": 0 or a quantization block without bits ended in a
    traceback, and one bad value aborted the process inside C++."""
    shutil.copytree(tiny_llama[0], tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps(dict(config, **change)))
    proc = run(LORA, "--model", tmp_path / "m", "--prompt", "hi", "-n", 2)
    assert_one_line_error(proc, f"{tmp_path / 'm' / 'config.json'}: ", message)


@pytest.mark.parametrize("flags, message", [
    (["--prompt", "hi", "--temp", "-1"], "--temp must be at least 0, got -1.0"),
    (["--prompt", "hi", "--top-p", "0"], "--top-p must be above 0 and at most 1, got 0.0"),
    (["--test", "--val-batches", "0"], "--val-batches must be at least 1 (or -1 for the whole set), got 0"),
    (["--test", "--test-batches", "0"], "--test-batches must be at least 1 (or -1 for the whole set), got 0"),
])
def test_out_of_range_generation_and_evaluation_flags_are_refused(tiny_llama, flags, message):
    """Once, these gave garbage or a loss of 0.000."""
    assert_one_line_error(run(LORA, "--model", tiny_llama[0], *flags), message)


def test_a_killed_conversion_leaves_nothing_the_next_run_keeps(tmp_path):
    """A conversion killed mid-write once left a hidden partial folder that later runs never removed."""
    src, out = tmp_path / "src", tmp_path / "out" / "model"
    make_checkpoint(src, n_layers=2, seed=1)
    (tmp_path / "out").mkdir()
    killed = subprocess.run([sys.executable, "-c", f"""
import os, signal, sys
sys.path.insert(0, {ROOT!r})
import utils, convert
real = convert.NpzWriter.write
def write_then_die(self, name, tensor):
    real(self, name, tensor)
    if name.startswith("layers.1"):
        os.kill(os.getpid(), signal.SIGKILL)
convert.NpzWriter.write = write_then_die
utils.run_script(lambda: convert.main(["--torch-path", {str(src)!r}, "--mlx-path", {str(out)!r}]))
"""])
    assert killed.returncode == -signal.SIGKILL
    left = os.listdir(tmp_path / "out")
    assert any(name.startswith(".model.tmp-") for name in left), left  # what the kill left
    assert run(CONVERT, "--torch-path", src, "--mlx-path", out).returncode == 0
    assert os.listdir(tmp_path / "out") == ["model"]  # the next run removed it


# ----------------------------------------------------------------------------- outputs and leftovers

def test_two_runs_on_one_output_are_refused(tiny_llama, data, tmp_path):
    adapter_file = tmp_path / "a.npz"
    with utils.claimed_output(str(adapter_file)):  # as a run in progress holds it
        proc = run(*train_args(tiny_llama[0], data, adapter_file))
    assert_one_line_error(proc, f"{adapter_file}: another run is writing this output")
    assert os.listdir(tmp_path) == []  # the holder's lock is gone with it


def test_a_folder_in_the_way_of_an_output_is_refused_before_loading(tiny_llama, data, tmp_path):
    (tmp_path / "a.json").mkdir()
    proc = run(*train_args(tiny_llama[0], data, tmp_path / "a.npz"))
    assert_one_line_error(proc, f"{tmp_path / 'a.json'}: a folder is in the way of an output file")
    assert "Loading model" not in proc.stderr


def test_stale_temporaries_of_a_killed_training_are_removed(tiny_llama, data, tmp_path):
    for stale in (".a.npz.k3j4h2.npz", ".a.metrics.jsonl.x1y2.tmp", ".a.npz.lock"):
        (tmp_path / stale).write_bytes(b"left by a killed run")
    assert run(*train_args(tiny_llama[0], data, tmp_path / "a.npz")).returncode == 0
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]


def _full_disk():
    """In the child: files may grow to 8 KB, and the write past it fails (EFBIG) instead of a signal."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))


def test_a_full_disk_names_the_file_and_keeps_the_previous_adapters(tiny_llama, data, tmp_path):
    adapter_file = tmp_path / "a.npz"
    assert run(*train_args(tiny_llama[0], data, adapter_file, "--lora-targets", "all")).returncode == 0
    before = adapter_file.read_bytes()
    assert len(before) > 8192
    proc = run(*train_args(tiny_llama[0], data, adapter_file, "--lora-targets", "all", "--learning-rate", "1e-2"),
               preexec_fn=_full_disk)
    assert_one_line_error(proc, f"{adapter_file}: not written (File too large); any previous a.npz is intact")
    assert adapter_file.read_bytes() == before
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]


def test_a_full_disk_while_logging_names_the_metrics_and_leaves_nothing(tiny_llama, data, tmp_path):
    adapter_file = tmp_path / "out" / "a.npz"
    proc = run(*train_args(tiny_llama[0], data, adapter_file, "--iters", "200", "--steps-per-report", "1",
                           "--save-every", "1000", "--steps-per-eval", "1000"), preexec_fn=_full_disk)
    assert_one_line_error(proc, f"{tmp_path / 'out' / 'a.metrics.jsonl'}: not written (File too large)")
    assert os.listdir(tmp_path) == []


def test_a_full_disk_while_converting_leaves_no_output(tmp_path):
    src, out = tmp_path / "src", tmp_path / "model"
    make_checkpoint(src, n_layers=2, seed=1)
    proc = run(CONVERT, "--torch-path", src, "--mlx-path", out, preexec_fn=_full_disk)
    assert_one_line_error(proc, f"{out}: not written (File too large)")
    assert sorted(os.listdir(tmp_path)) == ["src"]


# ----------------------------------------------------------------------------- non-finite values

def test_non_finite_base_weights_are_named(tiny_llama, data, tmp_path):
    shutil.copytree(tiny_llama[0], tmp_path / "m")
    weights = dict(mx.load(str(tmp_path / "m" / "weights.npz")))
    weights["layers.1.feed_forward.w2.weight"] = weights["layers.1.feed_forward.w2.weight"] * mx.nan
    mx.eval(weights)  # read before the file is replaced
    mx.savez(str(tmp_path / "m" / "weights.npz"), **weights)
    expected = "the model's layers.1.feed_forward.w2.weight holds NaN or infinity"
    assert_one_line_error(run(LORA, "--model", tmp_path / "m", "--prompt", "hi", "-n", 2),
                          "the prompt's logits is not finite", expected)
    assert_one_line_error(run(*train_args(str(tmp_path / "m"), data, tmp_path / "a.npz")),
                          "the loss of step 1 is not finite", expected)
    assert not os.path.exists(tmp_path / "a.npz")


def test_non_finite_adapters_are_refused_by_name(tiny_llama, data, tmp_path):
    adapter_file = tmp_path / "a.npz"
    assert run(*train_args(tiny_llama[0], data, adapter_file)).returncode == 0
    arrays = dict(mx.load(str(adapter_file)))
    arrays["layers.1.attention.wv.lora_b"] = arrays["layers.1.attention.wv.lora_b"] + mx.inf
    mx.eval(arrays)
    mx.savez(str(adapter_file), **arrays)
    with pytest.raises(UserError, match="a.npz: adapter layers.1.attention.wv.lora_b is not finite"):
        loading.load_model(tiny_llama[0], adapter_file=str(adapter_file))


def test_a_checkpoint_whose_values_overflow_float16_is_refused(tmp_path):
    import torch

    src = tmp_path / "src"
    make_checkpoint(src, n_layers=2, seed=1)
    sd = torch.load(src / "consolidated.00.pth", weights_only=True)
    sd["layers.0.feed_forward.w1.weight"][0, 0] = 1e6  # finite in float32, infinite in float16
    torch.save(sd, src / "consolidated.00.pth")
    assert_one_line_error(run(CONVERT, "--torch-path", src, "--mlx-path", tmp_path / "m", "--dtype", "float16"),
                          f"{src}: layers.0.feed_forward.w1.weight is not finite in float16")
    assert run(CONVERT, "--torch-path", src, "--mlx-path", tmp_path / "m").returncode == 0  # float32, as stored


# ----------------------------------------------------------------------------- files we read

def test_adapter_configuration_values_are_checked(tiny_llama, data, tmp_path):
    adapter_file = tmp_path / "a.npz"
    assert run(*train_args(tiny_llama[0], data, adapter_file)).returncode == 0
    config = json.loads((tmp_path / "a.json").read_text())
    for change, message in [({"rank": "8"}, "'rank' must be an integer"), ({"alpha": None}, "'alpha' must be a number"),
                            ({"targets": "wq"}, "'targets' must be a list"), ({"lora_layers": 0}, "'lora_layers'")]:
        (tmp_path / "a.json").write_text(json.dumps(dict(config, **change)))
        with pytest.raises(UserError, match=message):
            loading.load_model(tiny_llama[0], adapter_file=str(adapter_file))


def test_data_strings_that_are_not_unicode_name_their_line(tiny_llama, tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"text": "fine"}\n{"text": "lone \\ud800 surrogate"}\n')
    (folder / "valid.jsonl").write_text('{"text": "fine"}\n')
    proc = run(*train_args(tiny_llama[0], str(folder), tmp_path / "a.npz"))
    assert_one_line_error(proc, "train.jsonl: line 2: a string is not valid Unicode")


def test_lora_rank_beyond_the_layers_is_refused(tiny_llama, data, tmp_path):
    proc = run(*train_args(tiny_llama[0], data, tmp_path / "a.npz", "--lora-rank", 100000))
    assert_one_line_error(proc, "--lora-rank 100000 is more than 64, the smallest dimension")


def test_yaml_settings_are_typed_strictly(tmp_path):
    import lora

    for text, message in [('train: "no"\n', "expected true or false"), ("lora_rank: 8.0\n", "expected an integer"),
                          ("lora_targets: [wq, wv]\n", "expected a string"), ("iters: 1e30\n", "expected an integer"),
                          ('learning_rate: ".nan"\n', "expected a number"), ("learning_rate: .nan\n", "finite"),
                          ("seed: 100000000000000000000\n", "does not fit in a 64-bit integer"),
                          ('prompt: "\\ud800"\n', "not valid Unicode"), ("adapter_file: ''\n", "empty string")]:
        (tmp_path / "c.yaml").write_text(text)
        with pytest.raises(UserError, match=message):
            lora.parse_args(["--config", str(tmp_path / "c.yaml")])
    (tmp_path / "c.yaml").write_text("learning_rate: 1e-5\n")  # YAML 1.1 reads this as a string
    assert lora.parse_args(["--config", str(tmp_path / "c.yaml")]).learning_rate == 1e-5


def test_a_full_disk_while_writing_peft_adapters_names_the_file(tiny_llama, data, tmp_path):
    adapter_file = tmp_path / "a.npz"
    assert run(*train_args(tiny_llama[0], data, adapter_file, "--lora-targets", "all")).returncode == 0
    proc = run(FUSE, "--model", tiny_llama[0], "--adapter-file", adapter_file, "--peft-path", tmp_path / "peft",
               preexec_fn=_full_disk)
    assert_one_line_error(proc, f"{tmp_path / 'peft'}: not written")
    assert not os.path.exists(tmp_path / "peft")


def test_non_finite_adapters_are_named_by_fuse(tiny_llama, data, tmp_path):
    adapter_file = tmp_path / "a.npz"
    assert run(*train_args(tiny_llama[0], data, adapter_file)).returncode == 0
    arrays = dict(np.load(adapter_file))
    arrays["layers.1.attention.wq.lora_b"][0, 0] = np.nan
    np.savez(adapter_file, **arrays)
    for out in (["--save-path", tmp_path / "fused"], ["--peft-path", tmp_path / "peft"]):
        proc = run(FUSE, "--model", tiny_llama[0], "--adapter-file", adapter_file, *out)
        assert_one_line_error(proc, f"{adapter_file}: adapter layers.1.attention.wq.lora_b is not finite")
