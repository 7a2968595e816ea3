"""A training run is never lost: exact resume after SIGKILL or SIGINT, NaN guard, damaged files."""

import json
import os
import signal
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

import lora
import trainer
import loading
import dataset
from utils import UserError, read_jsonl
from helpers import LORA, assert_same_bits, read_adapters, wait_for_step, write_dataset

ITERS, SAVE_EVERY = 24, 4
KILL_IN_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kill_in_checkpoint.py")


def train_command(model_dir, data, adapter_file, *extra):
    # Dropout on, so the random stream must resume exactly too.
    return [sys.executable, LORA, "--model", model_dir, "--train", "--data", data,
            "--adapter-file", str(adapter_file), "--iters", str(ITERS), "--save-every", str(SAVE_EVERY),
            "--steps-per-report", "2", "--steps-per-eval", "8", "--learning-rate", "3e-3",
            "--lora-layers", "2", "--lora-dropout", "0.1", "--lora-targets", "all", "--batch-size", "3", *extra]


@pytest.fixture(scope="module")
def setting(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    data = write_dataset(root / "data", n_train=14, n_valid=4)
    reference = root / "reference" / "adapters.npz"
    run = subprocess.run(train_command(tiny_llama[0], data, reference), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return tiny_llama[0], data, read_adapters(reference), root


def resume_and_compare(setting, adapter_file):
    model_dir, data, reference, _ = setting
    run = subprocess.run(train_command(model_dir, data, adapter_file, "--resume", "latest"),
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "Resuming from" in run.stderr
    assert_same_bits(read_adapters(adapter_file), reference)
    # Steps a killed run logged after its last checkpoint are not logged twice.
    metrics = os.path.splitext(adapter_file)[0] + ".metrics.jsonl"
    reported = [r["step"] for _, r in read_jsonl(metrics) if "train_loss" in r]
    assert reported == sorted(set(reported)) and reported[-1] == ITERS


@pytest.mark.parametrize("kill_at_step", [4, 13])
def test_sigkill_while_writing_a_checkpoint_then_resume_is_exact(setting, tmp_path, kill_at_step):
    """kill_at_step 4 dies in the very first checkpoint write: resume starts from nothing."""
    model_dir, data, _, _ = setting
    adapter_file = tmp_path / "adapters.npz"
    killed_in = kill_at_step - kill_at_step % SAVE_EVERY
    command = train_command(model_dir, data, adapter_file)
    command[1:2] = [KILL_IN_CHECKPOINT, str(killed_in)]  # lora.py's flags after the step
    run = subprocess.run(command, capture_output=True, text=True)
    assert run.returncode == -signal.SIGKILL
    checkpoints = trainer.Checkpoints(str(tmp_path / "adapters-checkpoints"))
    assert checkpoints.all() == [checkpoints.path(s) for s in range(SAVE_EVERY, killed_in, SAVE_EVERY)]
    for path in checkpoints.all():
        assert trainer.load_checkpoint(path)[1]["step"] < killed_in  # every file left behind is readable
    if killed_in == SAVE_EVERY:  # died in the first write: nothing to resume from
        run = subprocess.run(train_command(model_dir, data, adapter_file, "--resume", "latest"),
                             capture_output=True, text=True)
        assert run.returncode == 2 and "no checkpoint to resume from" in run.stderr
    else:
        resume_and_compare(setting, adapter_file)


@pytest.mark.parametrize("after_step", [6, 15])
def test_sigkill_at_a_random_moment_then_resume_is_exact(setting, tmp_path, after_step):
    model_dir, data, _, _ = setting
    adapter_file = tmp_path / "adapters.npz"
    proc = subprocess.Popen(train_command(model_dir, data, adapter_file), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for_step(tmp_path / "adapters.metrics.jsonl", after_step, proc)
    proc.kill()
    proc.wait()
    resume_and_compare(setting, adapter_file)


def test_sigint_checkpoints_and_resume_is_exact(setting, tmp_path):
    model_dir, data, _, _ = setting
    adapter_file = tmp_path / "adapters.npz"
    proc = subprocess.Popen(train_command(model_dir, data, adapter_file), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_step(tmp_path / "adapters.metrics.jsonl", 9, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT
    assert "--resume latest" in err and "Traceback" not in err
    resume_and_compare(setting, adapter_file)


def test_only_the_newest_checkpoints_are_kept(setting):
    folder = setting[3] / "reference" / "adapters-checkpoints"
    assert sorted(os.listdir(folder)) == [f"step-{s:08d}.safetensors" for s in (16, 20, 24)]


def test_manifest_records_inputs_versions_and_command(setting):
    manifest = json.load(open(setting[3] / "reference" / "adapters.manifest.json"))
    assert set(manifest["inputs"]) == {"weights", "data.train", "data.valid"}
    assert all(len(i["sha256"]) == 64 for i in manifest["inputs"].values())
    assert manifest["versions"]["mlx"] == mx.__version__
    assert manifest["settings"]["lora_dropout"] == 0.1 and "--train" in manifest["command"]


def test_a_nan_step_is_skipped_reported_and_training_goes_on(tiny_llama, tmp_path, monkeypatch):
    data = write_dataset(tmp_path / "data")
    real_make_batch = dataset.make_batch
    calls = []

    def poisoned(data, indices):
        inputs, targets, mask = real_make_batch(data, indices)
        calls.append(1)
        if len(calls) == 3 and data.path.endswith("train.jsonl"):
            mask = mask * mx.nan  # a poisoned batch: its loss is NaN
        return inputs, targets, mask

    monkeypatch.setattr(dataset, "make_batch", poisoned)
    lora.main(["--model", tiny_llama[0], "--train", "--data", data, "--adapter-file", str(tmp_path / "a.npz"),
               "--iters", "8", "--steps-per-report", "4", "--learning-rate", "1e-2", "--lora-layers", "2"])
    records = [json.loads(l) for l in open(tmp_path / "a.metrics.jsonl")]
    assert [r["step"] for r in records if r.get("skipped")] == [1]  # the third batch built is step 1's
    assert records[-2]["skipped_steps"] == 1
    assert all(np.isfinite(v).all() for v in read_adapters(tmp_path / "a.npz").values())


def test_absurd_learning_rate_stops_and_leaves_no_non_finite_file(tiny_llama, tmp_path):
    data = write_dataset(tmp_path / "data")
    run = subprocess.run([sys.executable, LORA, "--model", tiny_llama[0], "--train", "--data", data,
                          "--adapter-file", str(tmp_path / "a.npz"), "--iters", "50", "--save-every", "2",
                          "--learning-rate", "1e30", "--lora-layers", "2", "--lora-targets", "all"],
                         capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    assert "non-finite steps in a row" in run.stderr and "lower --learning-rate" in run.stderr
    assert "Traceback" not in run.stderr
    written = [tmp_path / "a.npz"] + list((tmp_path / "a-checkpoints").glob("*.safetensors"))
    for path in written:
        if os.path.exists(path):
            assert all(np.isfinite(np.array(v, dtype=np.float32)).all() for v in mx.load(str(path)).values())


# ----------------------------------------------------------------------------- damaged files

def damage(path, how):
    raw = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(raw[: len(raw) // 2] if how == "truncate" else b"\x00garbage" + raw[9:])


@pytest.mark.parametrize("how", ["truncate", "corrupt"])
def test_damaged_checkpoint_is_a_clear_error(setting, tmp_path, how):
    model_dir, data, _, root = setting
    src = sorted((root / "reference" / "adapters-checkpoints").iterdir())[-1]
    folder = tmp_path / "adapters-checkpoints"
    folder.mkdir()
    (folder / src.name).write_bytes(src.read_bytes())
    damage(folder / src.name, how)
    run = subprocess.run(train_command(model_dir, data, tmp_path / "adapters.npz", "--resume", "latest"),
                         capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert f"{src.name}: not a readable checkpoint" in run.stderr


def test_checkpoint_of_another_lora_setup_is_a_clear_error(setting, tmp_path):
    model_dir, data, _, root = setting
    src = sorted((root / "reference" / "adapters-checkpoints").iterdir())[-2]  # before the end: resumable
    arrays, meta = trainer.load_checkpoint(str(src))
    arrays = {k: v[..., :4] if k.endswith("lora_b") or k.endswith("lora_b.m") else v for k, v in arrays.items()}
    (tmp_path / "adapters-checkpoints").mkdir()
    mx.save_safetensors(str(tmp_path / "adapters-checkpoints" / src.name), arrays,
                        metadata={"mlx_lora": json.dumps(meta)})
    run = subprocess.run(train_command(model_dir, data, tmp_path / "adapters.npz", "--resume", "latest"),
                         capture_output=True, text=True)
    assert run.returncode == 2 and "checkpoint does not fit this run" in run.stderr, (run.returncode, run.stderr)


@pytest.mark.parametrize("how", ["truncate", "corrupt"])
def test_damaged_adapter_file_is_a_clear_error(setting, tmp_path, how):
    model_dir, _, _, root = setting
    for suffix in (".npz", ".json"):
        (tmp_path / f"adapters{suffix}").write_bytes((root / "reference" / f"adapters{suffix}").read_bytes())
    damage(tmp_path / "adapters.npz", how)
    with pytest.raises(UserError, match="adapters.npz: cannot read adapter file"):
        loading.load_model(model_dir, adapter_file=str(tmp_path / "adapters.npz"))


def test_damaged_adapter_config_is_a_clear_error(setting, tmp_path):
    model_dir, _, _, root = setting
    (tmp_path / "adapters.npz").write_bytes((root / "reference" / "adapters.npz").read_bytes())
    (tmp_path / "adapters.json").write_text('{"rank": 8')
    with pytest.raises(UserError, match="adapters.json: line 1: invalid JSON"):
        loading.load_model(model_dir, adapter_file=str(tmp_path / "adapters.npz"))
    (tmp_path / "adapters.json").write_text('{"rank": 8}')
    with pytest.raises(UserError, match="adapters.json: bad adapter configuration"):
        loading.load_model(model_dir, adapter_file=str(tmp_path / "adapters.npz"))


@pytest.mark.parametrize("target, how, message", [
    ("weights.npz", "truncate", "weights.npz: cannot read weights"),
    ("weights.npz", "corrupt", "weights.npz: cannot read weights"),
    ("config.json", "truncate", "config.json: line"),
    ("tokenizer.model", "corrupt", "tokenizer.model: not a SentencePiece model"),
])
def test_damaged_model_files_are_clear_errors(tiny_llama, tmp_path, target, how, message):
    import shutil

    shutil.copytree(tiny_llama[0], tmp_path / "m")
    damage(tmp_path / "m" / target, how)
    with pytest.raises(UserError, match=message):
        loading.load_model(str(tmp_path / "m"))


def test_config_missing_a_key_is_a_clear_error(tiny_llama, tmp_path):
    import shutil

    shutil.copytree(tiny_llama[0], tmp_path / "m")
    config = json.load(open(tmp_path / "m" / "config.json"))
    del config["n_kv_heads"]
    json.dump(config, open(tmp_path / "m" / "config.json", "w"))
    with pytest.raises(UserError, match="config.json: missing key\\(s\\) n_kv_heads"):
        loading.load_model(str(tmp_path / "m"))


def test_unwritable_output_folder_is_a_clear_error(tiny_llama, tmp_path):
    if os.geteuid() == 0:
        target = "/proc/adapters.npz"  # root may write anywhere else
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        target = str(tmp_path / "ro" / "adapters.npz")
    data = write_dataset(tmp_path / "data")
    run = subprocess.run([sys.executable, LORA, "--model", tiny_llama[0], "--train", "--data", data,
                          "--adapter-file", target, "--iters", "2"], capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in run.stderr


def test_metrics_log_resumes_at_the_checkpoint_step_past_a_torn_line(tmp_path):
    path = tmp_path / "m.jsonl"
    lines = [json.dumps({"step": s, "train_loss": 1.0}) for s in range(1, 16)]
    path.write_text("\n".join(lines) + '\n{"step": 16, "train_lo')  # killed in mid-write
    log = trainer.MetricsLog(str(path), str(tmp_path / "m.png"), resume_step=12)
    log.log(step=13, train_loss=0.5)
    log.close()
    assert [r["step"] for _, r in read_jsonl(str(path))] == list(range(1, 14))


def test_a_run_whose_every_step_is_skipped_fails_and_leaves_nothing(setting, tmp_path):
    """A learning rate that makes every step non-finite ends in one line, before the untrained
    start is saved as a result: no adapters, manifest, metrics or folder are left."""
    model_dir, data, _, _ = setting
    adapter_file = tmp_path / "new" / "adapters.npz"
    run = subprocess.run([sys.executable, LORA, "--model", model_dir, "--train", "--data", data,
                          "--adapter-file", str(adapter_file), "--iters", "2", "--learning-rate", "1e308",
                          "--lora-layers", "1", "--batch-size", "2"], capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.splitlines()[-1].startswith("error: all 2 steps were non-finite")
    assert os.listdir(tmp_path) == []


def test_resume_on_another_base_model_of_the_same_shapes_is_refused(setting, tmp_path):
    """The checkpoint keeps the base weights' SHA-256: adapters trained on one model do not
    continue on another whose shapes happen to fit."""
    from checkpoints import make_checkpoint
    from conftest import convert_checkpoint

    model_dir, data, _, _ = setting
    make_checkpoint(tmp_path / "torch", "llama2", n_layers=2, seed=7)  # the same shapes, other weights
    other = convert_checkpoint(tmp_path / "torch", tmp_path / "other")
    adapter_file = tmp_path / "run" / "adapters.npz"
    first = subprocess.run(train_command(model_dir, data, adapter_file, "--iters", "4"), capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    run = subprocess.run(train_command(other, data, adapter_file, "--resume", "latest"), capture_output=True,
                         text=True)
    assert run.returncode == 2 and "checkpoint was made on another base model" in run.stderr.splitlines()[-1]


def test_resume_with_other_adapter_flags_is_refused(setting, tmp_path):
    model_dir, data, _, _ = setting
    adapter_file = tmp_path / "adapters.npz"
    first = subprocess.run(train_command(model_dir, data, adapter_file, "--iters", "4"), capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    same = subprocess.run(train_command(model_dir, data, adapter_file, "--iters", "6", "--resume", "latest"),
                          capture_output=True, text=True)
    assert same.returncode == 0, same.stderr  # the same command line (16 layers asked of a 2-layer model) resumes
    other = subprocess.run(train_command(model_dir, data, adapter_file, "--iters", "8", "--resume", "latest",
                                         "--lora-rank", "4"), capture_output=True, text=True)
    assert other.returncode == 2 and "the checkpoint trains --lora-rank 8" in other.stderr.splitlines()[-1]
