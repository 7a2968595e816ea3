"""convert.py: Meta / Mistral checkpoint folders in, MLX model folders out.

Bad inputs run the real CLI in subprocesses (in parallel: each start imports torch);
everything else calls convert.convert() in-process.
"""

import concurrent.futures
import contextlib
import io
import os
import shlex
import subprocess
import sys
import traceback

import numpy as np
import pytest
import torch

import utils  # noqa: F401  (before mlx.core)
import mlx.core as mx

import convert
from utils import UserError
import loading
import models
import settings
from checkpoints import ASSETS, FLAVOURS, make_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERT = os.path.join(ROOT, "convert.py")
STORIES = os.path.join(ASSETS, "stories260K")


def run_cli(*args):
    return subprocess.run([sys.executable, CONVERT, *args], capture_output=True, text=True, timeout=300)


def leftovers(parent):
    """Temporary folders convert.py may have left beside its output."""
    return [n for n in os.listdir(parent) if ".tmp-" in n or ".old-" in n]


def load(out, fmt="npz"):
    config = utils.read_json(os.path.join(out, "config.json"))
    return config, mx.load(os.path.join(out, f"weights.{fmt}"))


def as_numpy(a):
    return np.array(a.astype(mx.float32))


# ---- bad input: one-line error naming the file, non-zero exit, nothing left behind ----

class Evil:
    """Unpickling this would run a shell command (a harmless `touch`, so the test can see it)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def _resave(path, edit):
    sd = torch.load(path, weights_only=True)
    edit(sd)
    torch.save(sd, path)


def _edit_params(src, **changes):
    path = os.path.join(src, "params.json")
    utils.write_json(path, {**utils.read_json(path), **changes})


def _case_missing_folder(src):
    return [src, "checkpoint folder not found"]


def _case_missing_params(src):
    make_checkpoint(src)
    os.remove(os.path.join(src, "params.json"))
    return ["params.json", "not found"]


def _case_invalid_params(src):
    make_checkpoint(src)
    with open(os.path.join(src, "params.json"), "w") as f:
        f.write('{"dim": 64,')
    return ["params.json", "invalid JSON"]


def _case_missing_tokenizer(src):
    make_checkpoint(src)
    os.remove(os.path.join(src, "tokenizer.model"))
    return ["tokenizer.model", "not found"]


def _case_no_shards(src):
    make_checkpoint(src)
    os.remove(os.path.join(src, "consolidated.00.pth"))
    return ["no consolidated.NN.pth"]


def _case_missing_middle_shard(src):
    make_checkpoint(src, n_shards=4)
    os.remove(os.path.join(src, "consolidated.02.pth"))
    return ["consolidated.02.pth", "shard missing"]


def _case_shard_lacks_key(src):
    make_checkpoint(src, n_shards=2)
    _resave(os.path.join(src, "consolidated.01.pth"), lambda sd: sd.pop("layers.1.ffn_norm.weight"))
    return ["consolidated.01.pth", "missing key 'layers.1.ffn_norm.weight'"]


def _case_shard_wrong_shape(src):
    make_checkpoint(src, n_shards=2)
    key = "layers.0.attention.wq.weight"
    _resave(os.path.join(src, "consolidated.01.pth"), lambda sd: sd.update({key: sd[key][:8].clone()}))
    return ["consolidated.01.pth", key, "(8, 64)", "expected (32, 64)"]


def _case_replicas_differ(src):
    make_checkpoint(src, n_shards=2)
    _resave(os.path.join(src, "consolidated.01.pth"), lambda sd: sd["norm.weight"].add_(1.0))
    return ["consolidated.01.pth", "norm.weight", "differs"]


def _case_params_dim(src):
    make_checkpoint(src, "mistral")
    _edit_params(src, dim=128)
    return ["consolidated.00.pth", "tok_embeddings.weight", "(320, 64)", "expected (320, 128)"]


def _case_params_multiple_of(src):
    make_checkpoint(src, "llama2")  # hidden 192 from multiple_of 32; 256 gives 256
    _edit_params(src, multiple_of=256)
    return ["consolidated.00.pth", "layers.0.feed_forward.w1.weight", "hidden_dim 256"]


def _case_params_hidden_dim(src):
    make_checkpoint(src, "mistral")
    _edit_params(src, hidden_dim=100)
    return ["consolidated.00.pth", "layers.0.feed_forward.w1.weight", "hidden_dim 100"]


def _case_params_vocab(src):
    make_checkpoint(src, "mistral")
    _edit_params(src, vocab_size=32000)
    return ["consolidated.00.pth", "tok_embeddings.weight", "vocab_size 32000"]


def _case_params_kv_heads(src):
    make_checkpoint(src, "mistral")  # 2 KV heads in the weights
    _edit_params(src, n_kv_heads=4)
    return ["consolidated.00.pth", "layers.0.attention.wk.weight", "expected (64, 64)"]


def _case_params_wrong_type(src):
    make_checkpoint(src, "mistral")
    _edit_params(src, norm_eps="1e-5")
    return ["params.json", "'norm_eps' must be a positive number"]


def _case_params_n_layers(src):
    make_checkpoint(src)  # 2 layers
    _edit_params(src, n_layers=3)
    return ["consolidated.00.pth", "missing key 'layers.2."]


def _case_output_not_empty(src):
    make_checkpoint(src)
    os.makedirs(src + "-out")
    with open(os.path.join(src + "-out", "keep.txt"), "w") as f:
        f.write("mine")
    return [src + "-out", "not empty", "--force"]


def _case_malicious_pickle(src):
    make_checkpoint(src)
    marker = src + "-PWNED"
    torch.save({"tok_embeddings.weight": Evil(marker)}, os.path.join(src, "consolidated.00.pth"))
    return ["consolidated.00.pth", "refusing to load", "pickled code/objects"]


def _case_raw_pickle(src):
    import pickle
    make_checkpoint(src)
    marker = src + "-PWNED"
    with open(os.path.join(src, "consolidated.00.pth"), "wb") as f:
        pickle.dump({"tok_embeddings.weight": Evil(marker)}, f)  # not even a torch zip file
    return ["consolidated.00.pth", "not a zip archive"]


def _case_truncated_shard(src):
    make_checkpoint(src)
    path = os.path.join(src, "consolidated.00.pth")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    return ["consolidated.00.pth", "corrupt or truncated"]


BAD_CASES = {name[len("_case_"):]: fn for name, fn in globals().items() if name.startswith("_case_")}
# One case per kind of bad input runs the real CLI; the variants call convert() in-process
# (each CLI start imports torch: about 2 s of CPU).
CLI_CASES = {"missing_folder", "missing_params", "missing_tokenizer", "missing_middle_shard",
             "shard_wrong_shape", "params_dim", "output_not_empty", "malicious_pickle", "truncated_shard"}


def run_in_process(src, out):
    """convert.convert() under the scripts' real error handling (utils.exit_code), as a
    CompletedProcess."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            code = utils.exit_code(lambda: convert.convert(src, out))
        return subprocess.CompletedProcess([], code, "", err.getvalue())
    except Exception:
        return subprocess.CompletedProcess([], 1, "", traceback.format_exc())


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """Build every bad folder, then run the CLI cases in parallel and the rest in-process."""
    root = tmp_path_factory.mktemp("bad")
    jobs = {}
    for name, build in BAD_CASES.items():
        src = str(root / name)
        jobs[name] = (src, src + "-out", build(src))
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run_cli, "--torch-path", src, "--mlx-path", out)
                   for name, (src, out, _) in jobs.items() if name in CLI_CASES}
        results = {name: run_in_process(src, out) for name, (src, out, _) in jobs.items() if name not in CLI_CASES}
        results.update({name: f.result() for name, f in futures.items()})
    return {name: (jobs[name], results[name]) for name in jobs}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_is_one_line_error_and_leaves_nothing(case, bad_runs):
    (src, out, expected), proc = bad_runs[case]
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    for text in expected:
        assert text in lines[0], (text, lines[0])
    parent = os.path.dirname(out)
    assert leftovers(parent) == []
    if case == "output_not_empty":
        assert os.listdir(out) == ["keep.txt"]  # untouched
    else:
        assert not os.path.exists(out)


@pytest.mark.parametrize("case", ["malicious_pickle", "raw_pickle"])
def test_malicious_pickle_never_runs(case, bad_runs):
    (src, out, _), proc = bad_runs[case]
    marker = src + "-PWNED"
    assert proc.returncode != 0 and not os.path.exists(marker)
    if case == "malicious_pickle":
        # The payload is live: a trusting torch.load runs it (a harmless touch).
        torch.load(os.path.join(src, "consolidated.00.pth"), weights_only=False)
        assert os.path.exists(marker)


def test_parser_rejects_unsupported_bits_group_size_and_dtype():
    for flags in (["-q", "--q-bits", "7"], ["-q", "--q-group-size", "48"], ["--dtype", "float64"]):
        with pytest.raises(utils.UserError, match="invalid choice"):
            settings.parse(convert.ConvertSettings, ["--torch-path", "x", *flags], "")


def test_force_replaces_a_non_empty_output_only_when_complete(tmp_path):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    make_checkpoint(src)
    os.makedirs(out)
    with open(os.path.join(out, "old.txt"), "w") as f:
        f.write("old")
    convert.convert(src, out, force=True)
    assert sorted(os.listdir(out)) == ["config.json", "tokenizer.model", "weights.npz"]
    assert leftovers(str(tmp_path)) == []


def test_interrupted_conversion_leaves_the_old_output_untouched(tmp_path, monkeypatch):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    make_checkpoint(src)
    os.makedirs(out)
    with open(os.path.join(out, "old.txt"), "w") as f:
        f.write("old")
    calls = []
    real = convert.Plan.converted

    def interrupt_on_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(convert.Plan, "converted", interrupt_on_third)
    with pytest.raises(KeyboardInterrupt):
        convert.convert(src, out, force=True)
    assert os.listdir(out) == ["old.txt"] and leftovers(str(tmp_path)) == []


# ---- good input ----

def test_sharded_checkpoint_merges_bit_exact(tmp_path):
    """The same weights split over 1, 2 or 4 model-parallel shards convert to the same model."""
    configs = []
    for n in (1, 2, 4):
        src, out = str(tmp_path / f"src{n}"), str(tmp_path / f"out{n}")
        ck = make_checkpoint(src, "mistral", n_shards=n, seed=3, n_heads=8, n_kv_heads=4)
        convert.convert(src, out, dtype="float32")
        config, weights = load(out)
        configs.append(config)
        assert sorted(weights) == sorted(ck.state_dict)
        for key, value in ck.state_dict.items():
            assert np.array_equal(np.array(weights[key]), value.numpy()), (n, key)
    assert configs[0] == configs[1] == configs[2]


def test_sharded_checkpoint_quantizes_like_the_unsharded_one(tmp_path):
    # w2's full last dim (192) holds 3 groups of 64; a shard's half (96) would not.
    outs = {}
    for n in (1, 2):
        src, out = str(tmp_path / f"src{n}"), str(tmp_path / f"out{n}")
        make_checkpoint(src, "mistral", n_shards=n, seed=5)
        convert.convert(src, out, quantize=True, q_group_size=64, q_bits=4, fmt="safetensors")
        outs[n] = load(out, "safetensors")
    assert outs[1][0] == outs[2][0]
    assert sorted(outs[1][1]) == sorted(outs[2][1]) and "layers.0.feed_forward.w2.scales" in outs[2][1]
    for key, value in outs[1][1].items():
        assert np.array_equal(np.array(value), np.array(outs[2][1][key])), key


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_params_flavours_give_the_right_config(tmp_path, flavour):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    ck = make_checkpoint(src, flavour, dtype=torch.bfloat16)
    convert.convert(src, out)  # each weight keeps its stored type
    config, weights = load(out)
    assert config == {**ck.config, "dtype": "bfloat16"}
    assert list(config) == ["dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim",
                            "norm_eps", "vocab_size", "rope_theta", "sliding_window", "dtype"]
    assert "rope.freqs" not in weights and sorted(weights) == sorted(ck.state_dict)
    with open(os.path.join(src, "tokenizer.model"), "rb") as a, open(os.path.join(out, "tokenizer.model"), "rb") as b:
        assert a.read() == b.read()
    w2 = weights["layers.1.feed_forward.w2.weight"]
    assert w2.dtype == mx.bfloat16
    assert np.array_equal(as_numpy(w2), ck.state_dict["layers.1.feed_forward.w2.weight"].numpy())


def test_llama2_gqa_and_ffn_multiplier_are_checked_against_the_weights(tmp_path):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    ck = make_checkpoint(src, "llama2", n_heads=8, n_kv_heads=2, ffn_dim_multiplier=1.3, multiple_of=16)
    convert.convert(src, out, dtype="float16")
    config, _ = load(out)
    assert (config["n_kv_heads"], config["head_dim"], config["hidden_dim"]) == (2, 8, 224)  # int(1.3*170)=221 -> 224
    assert config == {**ck.config, "dtype": "float16"}


@pytest.mark.skipif(not os.path.isdir(STORIES), reason="stories260K asset not present")
def test_real_stories260k_checkpoint(tmp_path):
    out = str(tmp_path / "out")
    convert.convert(STORIES, out, dtype="float32")
    config, weights = load(out)
    assert {k: config[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "vocab_size")} \
        == {"dim": 64, "n_layers": 5, "n_heads": 8, "n_kv_heads": 4, "head_dim": 8, "hidden_dim": 172, "vocab_size": 512}
    source = torch.load(os.path.join(STORIES, "consolidated.00.pth"), weights_only=True)
    for key, value in source.items():
        assert np.array_equal(np.array(weights[key]), value.numpy()), key


@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_dtype_is_what_mx_load_returns(tmp_path, dtype, fmt):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    ck = make_checkpoint(src, "mistral")
    convert.convert(src, out, dtype=dtype, fmt=fmt)
    config, weights = load(out, fmt)
    assert config["dtype"] == dtype
    assert {w.dtype for w in weights.values()} == {getattr(mx, dtype)}
    torch_dtype = getattr(torch, dtype)
    for key, value in ck.state_dict.items():
        assert np.array_equal(as_numpy(weights[key]), value.to(torch_dtype).float().numpy()), key


def test_npz_writer_round_trips_through_mx_load(tmp_path):
    path = str(tmp_path / "w.npz")
    arrays = {"f16": mx.random.normal((3, 5)).astype(mx.float16), "bf16": mx.random.normal((4, 7)).astype(mx.bfloat16),
              "f32": mx.random.normal((2, 3, 4)), "u32": mx.arange(12, dtype=mx.uint32).reshape(3, 4),
              "scalar_row": mx.random.normal((6,))}
    writer = convert.NpzWriter(path)
    for name, a in arrays.items():
        writer.write(name, a)
    writer.close()
    loaded = mx.load(path)
    assert loaded["bf16"].dtype == mx.bfloat16 and loaded["u32"].dtype == mx.uint32
    for name, a in arrays.items():
        assert loaded[name].shape == a.shape and loaded[name].dtype == a.dtype
        assert mx.array_equal(loaded[name], a).item(), name
    assert np.load(path)["f16"].dtype == np.float16  # numpy reads it too


# ---- quantization ----

def _data_bytes(shapes, bits, group_size, itemsize, quantize):
    total = 0
    for key, shape in shapes.items():
        n = int(np.prod(shape))
        if quantize and len(shape) == 2 and shape[-1] % group_size == 0:
            total += n * bits / 8 + 2 * (n / group_size) * itemsize  # packed weights + scales + biases
        else:
            total += n * itemsize
    return total


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_files_shrink_and_dequantize_within_one_step(tmp_path, bits):
    group_size = 64
    src = str(tmp_path / "src")
    # dim 256 keeps zip headers under 1 % of the file; hidden 704 = 11 groups of 64.
    ck = make_checkpoint(src, "llama2", dim=256, n_heads=4)
    sizes = {}
    for name, quantize in (("plain", False), ("quant", True)):
        out = str(tmp_path / name)
        convert.convert(src, out, quantize=quantize, q_bits=bits, q_group_size=group_size, dtype="float32")
        sizes[name] = os.path.getsize(os.path.join(out, "weights.npz"))
    shapes = models.NAMES.shapes(ck.config)
    expected = _data_bytes(shapes, bits, group_size, 4, True) / _data_bytes(shapes, bits, group_size, 4, False)
    assert sizes["quant"] / sizes["plain"] == pytest.approx(expected, rel=0.02)

    config, weights = load(str(tmp_path / "quant"))
    assert config["quantization"] == {"group_size": group_size, "bits": bits}
    for key in ("tok_embeddings.weight", "output.weight", "layers.0.attention.wk.weight",
                "layers.1.feed_forward.w2.weight"):
        base = key[: -len(".weight")]
        w = weights[key]
        scales, biases = weights[base + ".scales"], weights[base + ".biases"]
        assert w.dtype == mx.uint32 and scales.dtype == mx.float32
        original = ck.state_dict[key].numpy()
        restored = np.array(mx.dequantize(w, scales, biases, group_size=group_size, bits=bits))
        # MLX's affine grid has steps of |scale| per group; it keeps one end of the group's
        # range exact, so the error is at most one step (half a step from rounding, up to
        # another half from the grid's alignment).
        err = np.abs(restored - original).reshape(original.shape[0], -1, group_size).max(axis=-1)
        step = np.abs(np.array(scales))
        assert np.all(err <= step * (1 + 1e-4) + 1e-7), key
        assert np.abs(restored - original).mean() < 0.35 * step.mean()  # rounding: about step / 4
    assert "layers.0.attention_norm.scales" not in weights  # norms stay as they are
    assert weights["norm.weight"].dtype == mx.float32


def test_quantization_skips_weights_whose_last_dim_is_not_a_group_multiple(tmp_path):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    ck = make_checkpoint(src, "mistral", dim=128, hidden_dim=192)  # w2's last dim is not a multiple of 128
    convert.convert(src, out, quantize=True, q_group_size=128, q_bits=4, dtype="bfloat16")
    config, weights = load(out)
    assert config["quantization"] == {"group_size": 128, "bits": 4}
    assert "layers.0.feed_forward.w2.scales" not in weights
    assert weights["layers.0.feed_forward.w2.weight"].dtype == mx.bfloat16
    assert "layers.0.feed_forward.w1.scales" in weights  # rows of 128 are
    assert sorted(k for k in weights if not k.endswith((".scales", ".biases"))) == sorted(ck.state_dict)
    assert loading.load_model(out)[0].layers[0].feed_forward.w2.weight.dtype == mx.float32  # loads: w2 float


def test_nothing_quantizable_is_refused_not_written_as_floats(tmp_path):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    make_checkpoint(src, "mistral")  # dim 64, hidden 192: no last dim is a multiple of 128
    with pytest.raises(UserError, match="no weight's rows split into groups of 128"):
        convert.convert(src, out, quantize=True, q_group_size=128, q_bits=4)
    assert not os.path.exists(out)


def test_quantized_safetensors_matches_npz(tmp_path):
    src = str(tmp_path / "src")
    make_checkpoint(src, "mistral")
    results = {}
    for fmt in ("npz", "safetensors"):
        out = str(tmp_path / fmt)
        convert.convert(src, out, quantize=True, q_group_size=32, q_bits=3, dtype="float16", fmt=fmt)
        results[fmt] = load(out, fmt)
    assert results["npz"][0] == results["safetensors"][0]
    a, b = results["npz"][1], results["safetensors"][1]
    assert sorted(a) == sorted(b) and "layers.0.feed_forward.w2.scales" in a
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(np.array(a[key]), np.array(b[key])), key


def test_q_says_which_matrices_stay_float_and_refuses_when_none_would_be_quantized(tmp_path):
    """Rows the group size cannot divide stay float: said in a note, and -q that would quantize
    nothing is an error rather than a float model reported as 4-bit."""
    def convert_q(source, out):
        return subprocess.run([sys.executable, os.path.join(ROOT, "convert.py"), "--hf-path", str(source),
                               "--mlx-path", str(out), "-q", "--q-group-size", "128"], capture_output=True, text=True)

    make_checkpoint(tmp_path / "src", "llama2", n_layers=1, seed=1, dim=128, n_heads=4)  # hidden 352
    partial = convert_q(tmp_path / "src", tmp_path / "q128")
    assert partial.returncode == 0 and "note: 1 matrices stay float32: their rows of 352 values" in partial.stderr
    _, weights = load(str(tmp_path / "q128"))
    assert "layers.0.feed_forward.w1.scales" in weights and "layers.0.feed_forward.w2.scales" not in weights
    make_checkpoint(tmp_path / "small", "llama2", n_layers=1, seed=1)  # dim 64: no row splits into 128
    refused = convert_q(tmp_path / "small", tmp_path / "refused")
    assert refused.returncode == 2 and "no weight's rows split into groups of 128" in refused.stderr
    assert not os.path.exists(tmp_path / "refused")
