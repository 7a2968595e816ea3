"""LoRA / QLoRA training, validation, test, adapters and data errors (lora.py)."""

import json
import math
import os
import random
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch

import lora
import settings
import models
from checkpoints import make_checkpoint, reference_logits
from conftest import convert_checkpoint
import trainer
import loading
import dataset
import adapters
from mlx.utils import tree_flatten, tree_map
from utils import UserError
from helpers import LORA, THINGS, run_training, story, write_dataset, write_split



def losses(records, key):
    return [r[key] for r in records if key in r]


@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    data = write_dataset(root / "data")
    records = run_training(tiny_llama[0], data, root / "adapters.npz")
    return tiny_llama[0], data, root / "adapters.npz", records


def test_training_lowers_loss_and_writes_outputs(trained):
    _, _, adapter_file, records = trained
    train_losses = losses(records, "train_loss")
    assert train_losses[-1] < 0.6 * train_losses[0]
    val = losses(records, "val_loss")
    assert len(val) == 3 and all(math.isfinite(v) for v in val) and val[-1] < val[0]
    for suffix in (".npz", ".json", ".metrics.jsonl", ".loss.png"):
        assert os.path.getsize(os.path.splitext(adapter_file)[0] + suffix) > 0
    assert {"learning_rate", "tokens_per_s", "it_per_s", "peak_memory_gb"} <= set(records[1])


def test_adapters_reload_from_file_alone_gives_same_logits(trained):
    model_dir, data, adapter_file, _ = trained
    config = json.load(open(os.path.splitext(adapter_file)[0] + ".json"))
    assert config == {"lora_layers": 2, "targets": ["wq", "wv"], "rank": 8, "alpha": 16.0, "dropout": 0.0,
                      "fine_tune_type": "lora"}
    tokens = mx.array([[1, 20, 30, 40, 50, 60]])
    base, _, _ = loading.load_model(model_dir)
    adapted, _, _ = loading.load_model(model_dir, adapter_file=str(adapter_file))
    # The same adapters applied by hand to a fresh model: identical logits.
    by_hand, _, _ = loading.load_model(model_dir)
    models.apply_lora(by_hand, models.AdapterConfig(layers=2))
    by_hand.load_weights(str(adapter_file), strict=False)
    np.testing.assert_array_equal(np.array(adapted(tokens)), np.array(by_hand(tokens)))
    assert np.abs(np.array(adapted(tokens)) - np.array(base(tokens))).max() > 1e-3  # training moved it


def folded_in_float64(adapted):
    """The adapted model's weights in Meta's names, each adapter folded in float64: W + scale (A B)^T."""
    weights = {}
    for name, module in adapted.named_modules():
        if isinstance(module, models.LoRALinear):
            weights[f"{name}.weight"] = (np.array(module.linear.weight, np.float64)
                                         + module.scale * (np.array(module.lora_a, np.float64)
                                                           @ np.array(module.lora_b, np.float64)).T)
    for key, value in tree_flatten(adapted.parameters()):
        if not key.endswith((".lora_a", ".lora_b", ".linear.weight")):
            weights[key] = np.array(value, np.float64)
    return weights


def test_adapters_merged_for_generation_give_the_same_logits(trained):
    """Generation alone (lora.py --prompt) folds the adapters into float bases, one
    product a layer: the adapted model's logits, for a prompt and for decoding; a
    quantized base keeps its adapters (folding would requantize it)."""
    model_dir, _, adapter_file, _ = trained
    adapted, _, _ = loading.load_model(model_dir, adapter_file=str(adapter_file))
    merged, _, _ = loading.load_model(model_dir, adapter_file=str(adapter_file), generation_only=True)
    assert not any(isinstance(m, models.LoRALinear) for _, m in merged.named_modules())
    # Both against the adapted model in float64: the folded model may stray a few times as far as
    # float32 arithmetic takes the unfolded one, whatever the BLAS's order of sums; an adapter
    # folded wrongly moves the logits by 0.1 or more (scale 0.9: 0.73).
    params = {key: getattr(adapted.args, key) for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                                                          "norm_eps")}
    tokens = [[1, 20, 30, 40, 50, 60, 7]]
    exact = reference_logits(folded_in_float64(adapted), params, tokens, compute_dtype=torch.float64)
    adapted_cache, merged_cache = adapted.make_cache(), merged.make_cache()
    for part in (slice(0, 6), slice(6, 7)):  # the prompt, then one decoded token over the cache
        step = mx.array([tokens[0][part]])
        float32_error = np.abs(np.array(adapted(step, adapted_cache)) - exact[:, part]).max()
        folded_error = np.abs(np.array(merged(step, merged_cache)) - exact[:, part]).max()
        assert folded_error <= 4 * float32_error + 1e-6, (folded_error, float32_error)
    qlora, _, _ = loading.load_model(model_dir)
    nn.quantize(qlora, 32, 4)
    models.apply_lora(qlora, models.AdapterConfig(layers=2))  # wq and wv of 2 layers
    adapters.merge(qlora)
    assert sum(isinstance(m, models.LoRALinear) for _, m in qlora.named_modules()) == 4


def test_test_split_reports_finite_loss_and_perplexity(trained):
    model_dir, data, adapter_file, _ = trained
    run = subprocess.run([sys.executable, LORA, "--model", model_dir, "--data", data, "--test",
                          "--adapter-file", str(adapter_file), "--test-batches", "-1"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    loss, ppl = (float(x.rstrip(".,")) for x in run.stdout.split()[2::3][:2])
    assert abs(ppl - math.exp(loss)) < 1e-2 * ppl
    # The adapted model's loss on the whole test split, not the base model's.
    adapted, tokenizer, _ = loading.load_model(model_dir, adapter_file=str(adapter_file))
    test_set = dataset.load_split(data, "test", tokenizer, 2048, False)
    assert loss == pytest.approx(lora.evaluate(adapted, test_set, 4, -1), abs=1e-3)
    base, _, _ = loading.load_model(model_dir)
    assert abs(loss - lora.evaluate(base, test_set, 4, -1)) > 1e-2


def test_zero_initialized_lora_equals_base(tiny_llama):
    """Every target of both layers is wrapped, and with B at zero the adapted model is the base;
    B moved, the logits move."""
    base, _, _ = loading.load_model(tiny_llama[0])
    adapted, _, _ = loading.load_model(tiny_llama[0])
    models.apply_lora(adapted, models.AdapterConfig(layers=2, targets=tuple(models.NAMES.parts), rank=4))
    wrapped = [name for name, m in adapted.named_modules() if isinstance(m, models.LoRALinear)]
    assert len(wrapped) == 2 * len(models.NAMES.parts)
    tokens = mx.array([[1, 7, 8, 9, 10]])
    np.testing.assert_array_equal(np.array(adapted(tokens)), np.array(base(tokens)))
    adapted.update(tree_map(lambda p: p + 0.05, adapted.trainable_parameters()))
    assert np.abs(np.array(adapted(tokens)) - np.array(base(tokens))).max() > 1e-2


def test_only_lora_parameters_train(tiny_llama):
    model, _, _ = loading.load_model(tiny_llama[0])
    models.apply_lora(model, models.AdapterConfig(layers=2))
    names = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert names and all(k.endswith(("lora_a", "lora_b")) for k in names)


def test_qlora_on_4bit_base_trains(tmp_path):
    make_checkpoint(tmp_path / "torch", "llama2", seed=2)
    model_dir = convert_checkpoint(tmp_path / "torch", tmp_path / "q4", quantize=True, q_bits=4, q_group_size=32)
    records = run_training(model_dir, write_dataset(tmp_path / "data"), tmp_path / "ad.npz", "--iters", "30")
    train_losses = losses(records, "train_loss")
    assert train_losses[-1] < 0.7 * train_losses[0]
    assert losses(records, "val_loss")[-1] < losses(records, "val_loss")[0]


def test_stories260k_short_run_lowers_validation_loss(stories_model, tmp_path):
    rng = random.Random(1)
    folder = tmp_path / "stories"
    for split, n in (("train", 32), ("valid", 8), ("test", 4)):
        write_split(folder, split, [{"text": f"Once upon a time, {story(rng)} The end."} for _ in range(n)])
    records = run_training(stories_model, str(folder), tmp_path / "ad.npz", "--iters", "30",
                           "--learning-rate", "3e-3", "--lora-layers", "5", "--steps-per-eval", "30")
    val = losses(records, "val_loss")
    assert val[-1] < 0.8 * val[0]


# ----------------------------------------------------------------------------- batching and loss

@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return loading.load_model(tiny_llama[0])[1]


def test_loss_counts_exactly_the_real_target_tokens(tokenizer, tmp_path):
    rng = random.Random(3)
    write_split(tmp_path, "train", [{"text": " ".join(rng.choice(THINGS) for _ in range(rng.randint(1, 12)))}
                                    for _ in range(9)])
    ds = dataset.load_split(str(tmp_path), "train", tokenizer, 2048, False)
    for indices in dataset.batch_plan(ds, 4):
        inputs, _, mask = dataset.make_batch(ds, indices)
        assert inputs.shape[1] % dataset.PAD_TO == 0  # few shapes: the compiled step traces each once
        assert mask.sum().item() == sum(len(ds.tokens[i]) - 1 for i in indices)


def test_mask_prompt_excludes_prompt_tokens(tokenizer, tmp_path):
    rows = [{"prompt": "Q: What is a cat?\nA:", "completion": " A cat is a small animal."},
            {"prompt": "Q: Where is Tom?\nA:", "completion": " Tom is in the park."}]
    write_split(tmp_path, "train", rows)
    masked = dataset.load_split(str(tmp_path), "train", tokenizer, 2048, True)
    full = dataset.load_split(str(tmp_path), "train", tokenizer, 2048, False)
    _, targets, mask = dataset.make_batch(masked, [0, 1])
    completion_tokens = 0
    for row in rows:
        n_prompt = len(tokenizer.encode(row["prompt"]))
        total = len(tokenizer.encode(row["prompt"] + row["completion"], eos=True))
        assert tokenizer.encode(row["prompt"] + row["completion"])[:n_prompt] == tokenizer.encode(row["prompt"])
        completion_tokens += total - n_prompt  # completion tokens plus EOS
    assert mask.sum().item() == completion_tokens
    assert dataset.make_batch(full, [0, 1])[2].sum().item() == sum(len(t) - 1 for t in full.tokens)
    # The first counted target of each row is the completion's first token.
    first = int(np.argmax(np.array(mask[0])))
    assert targets[0, first].item() == tokenizer.encode(rows[0]["prompt"] + rows[0]["completion"])[
        len(tokenizer.encode(rows[0]["prompt"]))]


def test_every_example_is_seen_each_epoch_including_the_partial_batch(tokenizer, tmp_path):
    write_split(tmp_path, "train", [{"text": f"the cat {i}"} for i in range(10)])
    ds = dataset.load_split(str(tmp_path), "train", tokenizer, 2048, False)
    plan = dataset.batch_plan(ds, 4)
    assert [len(b) for b in plan] == [4, 4, 2]
    for epoch in range(3):
        seen = [i for step in range(epoch * 3, epoch * 3 + 3)
                for i in plan[dataset.training_batch_order(len(plan), 0, step)]]
        assert sorted(seen) == list(range(10))


def test_training_set_smaller_than_batch_size_trains(tiny_llama, tmp_path):
    write_split(tmp_path / "d", "train", [{"text": "the cat sat"}, {"text": "the dog ran"}])
    write_split(tmp_path / "d", "valid", [{"text": "the cat ran"}])
    records = run_training(tiny_llama[0], str(tmp_path / "d"), tmp_path / "ad.npz", "--iters", "6")
    train_losses = losses(records, "train_loss")
    assert len(train_losses) == 2 and all(0 < loss < 20 for loss in train_losses)  # steps 5 and 6
    assert not any(r.get("skipped") for r in records)


def test_whole_set_validation_weighs_every_token_once(tiny_llama, tokenizer, tmp_path):
    """7 examples in batches of 4 (a partial last batch) or of 1: the same token-weighted mean."""
    model, _, _ = loading.load_model(tiny_llama[0])
    write_split(tmp_path, "valid", [{"text": story(random.Random(i))} for i in range(7)])
    ds = dataset.load_split(str(tmp_path), "valid", tokenizer, 2048, False)
    assert lora.evaluate(model, ds, 4, -1) == pytest.approx(lora.evaluate(model, ds, 1, -1), rel=1e-5)


def test_learning_rate_schedule_warms_up_then_decays_to_the_end_value():
    schedule = trainer.learning_rate_schedule(1e-3, iters=10, warmup=2, end=1e-4)
    values = [schedule(mx.array(step)).item() for step in (0, 1, 2, 6, 10)]
    assert values[:3] == pytest.approx([0.0, 5e-4, 1e-3])
    assert values[3] == pytest.approx(1e-4 + 0.9e-3 * (1 + math.cos(math.pi * 4 / 8)) / 2)
    assert values[4] == pytest.approx(1e-4)
    held = trainer.learning_rate_schedule(1e-3, iters=10, warmup=2, cosine=False)
    assert [held(mx.array(step)).item() for step in (1, 2, 9)] == pytest.approx([5e-4, 1e-3, 1e-3])
    assert trainer.learning_rate_schedule(1e-3, iters=10, cosine=False) == 1e-3  # a plain constant


def test_long_examples_are_truncated_with_one_warning(tokenizer, tmp_path, capsys):
    write_split(tmp_path, "train", [{"text": "the cat " * 50}, {"text": "the dog " * 80}, {"text": "short"}])
    ds = dataset.load_split(str(tmp_path), "train", tokenizer, 32, False)
    assert max(len(t) for t in ds.tokens) == 32
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "2 example(s)" in err and "longest" in err


def test_non_finite_loss_stops_training_and_writes_no_adapters(tiny_llama, tmp_path, monkeypatch):
    data = write_dataset(tmp_path / "data")
    real_apply = models.apply_lora

    def poisoned_apply(model, *a, **k):
        config = real_apply(model, *a, **k)
        model.layers[-1].attention.wq.lora_a = mx.full(model.layers[-1].attention.wq.lora_a.shape, mx.nan)
        return config

    monkeypatch.setattr(models, "apply_lora", poisoned_apply)
    # The stop names what is not finite, instead of blaming the learning rate.
    with pytest.raises(UserError, match="step 1 is not finite: the model's layers.1.attention.wq.lora_a holds NaN"):
        run_training(tiny_llama[0], data, tmp_path / "ad.npz", "--max-bad-steps", "3")
    assert not os.path.exists(tmp_path / "ad.npz")


# ----------------------------------------------------------------------------- configuration

def test_yaml_config_sets_defaults_and_flags_win(tmp_path):
    (tmp_path / "c.yaml").write_text("lora-rank: 4\nlearning_rate: 0.001\nlora_targets: all\nmask-prompt: true\n")
    args = lora.parse_args(["--config", str(tmp_path / "c.yaml"), "--lora-rank", "16"])
    assert (args.lora_rank, args.learning_rate, args.lora_targets, args.mask_prompt) == (16, 1e-3, "all", True)


@pytest.mark.parametrize("text, message", [("bogus_key: 1\n", "unknown key 'bogus_key'"),
                                           ("lora_rank: many\n", "key 'lora_rank'"),
                                           ("lr_schedule: linear\n", "must be one of constant, cosine, got .linear."),
                                           ("[1, 2\n", "invalid YAML")])
def test_bad_yaml_config_is_a_clear_error(tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(UserError, match=message):
        lora.parse_args(["--config", str(tmp_path / "c.yaml")])


def test_adapters_that_do_not_fit_are_a_clear_error(trained, tmp_path):
    make_checkpoint(tmp_path / "torch", "llama2", dim=32, n_heads=4, seed=9)
    other = convert_checkpoint(tmp_path / "torch", tmp_path / "mlx")
    with pytest.raises(UserError, match="adapters.npz: adapters do not fit this model"):
        loading.load_model(other, adapter_file=str(trained[2]))


def test_help_explains_every_flag():
    parser = settings.build_parser(lora.LoraSettings, lora.DESCRIPTION)
    assert all(a.help for a in parser._actions)


# ----------------------------------------------------------------------------- data errors

BAD_LINES = [
    ('{"text": "fine"}\n{"text": "unterminated\n', "train.jsonl: line 2: invalid JSON"),
    ('{"text": "fine"}\n{"body": "no key"}\n', "train.jsonl: line 2: expected key 'messages', 'text'"),
    ('{"text": "   "}\n', "train.jsonl: line 1: 'text' must be a non-empty string"),
    ('{"prompt": "Q", "completion": ""}\n', "train.jsonl: line 1: 'prompt' must be a string and 'completion'"),
    ('["a", "list"]\n', "train.jsonl: line 1: expected a JSON object"),
    (b'{"text": "caf\xe9"}\n', "train.jsonl: line 1: not UTF-8"),
]


@pytest.mark.parametrize("content, message", BAD_LINES)
def test_bad_data_lines_name_file_and_line(tokenizer, tmp_path, content, message):
    mode = "wb" if isinstance(content, bytes) else "w"
    with open(tmp_path / "train.jsonl", mode) as f:
        f.write(content)
    with pytest.raises(UserError, match=message):
        dataset.load_split(str(tmp_path), "train", tokenizer, 2048, False)


def test_mask_prompt_on_text_lines_is_an_error(tokenizer, tmp_path):
    write_split(tmp_path, "train", [{"text": "the cat"}])
    with pytest.raises(UserError, match="line 1: --mask-prompt needs 'prompt' and 'completion'"):
        dataset.load_split(str(tmp_path), "train", tokenizer, 2048, True)


@pytest.mark.parametrize("missing, message", [("valid", "valid.jsonl: file not found"),
                                              ("train-empty", "train.jsonl: no training examples")])
def test_missing_or_empty_splits_fail_before_training(tiny_llama, tmp_path, missing, message):
    data = tmp_path / "d"
    write_split(data, "train", [] if missing == "train-empty" else [{"text": "the cat"}])
    if missing != "valid":
        write_split(data, "valid", [{"text": "the cat"}])
    run = subprocess.run([sys.executable, LORA, "--model", tiny_llama[0], "--train", "--data", str(data),
                          "--adapter-file", str(tmp_path / "ad.npz"), "--iters", "2"],
                         capture_output=True, text=True)
    assert run.returncode == 2
    assert message in run.stderr and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 2  # "Loading model ..." and the one-line error
    assert not os.path.exists(tmp_path / "ad.npz")


def test_grad_checkpoint_trains_the_same_adapters(tiny_llama, tmp_path, monkeypatch):
    """--grad-checkpoint recomputes every block in backward (each goes through mx.checkpoint) and
    its memory estimate counts one block's activations; the adapters are the same."""
    checkpointed, estimated_with_checkpoints = [], []
    real_checkpoint, real_check_memory = mx.checkpoint, trainer.check_memory

    def check_memory(args, batch_size, seq_len, grad_checkpoint=False):
        estimated_with_checkpoints.append(grad_checkpoint)
        return real_check_memory(args, batch_size, seq_len, grad_checkpoint)

    monkeypatch.setattr(mx, "checkpoint", lambda fn: checkpointed.append(fn) or real_checkpoint(fn))
    monkeypatch.setattr(trainer, "check_memory", check_memory)
    data = write_dataset(tmp_path / "data")
    for name, flags in (("plain", []), ("ckpt", ["--grad-checkpoint"])):
        checkpointed.clear()
        run_training(tiny_llama[0], data, tmp_path / f"{name}.npz", "--iters", "6", "--lr-schedule", "cosine",
                     "--warmup", "2", *flags)
        assert bool(checkpointed) == (name == "ckpt")  # traced once per block by the compiled step
    assert estimated_with_checkpoints == [False, True]
    plain, ckpt = mx.load(str(tmp_path / "plain.npz")), mx.load(str(tmp_path / "ckpt.npz"))
    assert plain.keys() == ckpt.keys()
    for key in plain:  # recomputing activations changes memory, not the result
        np.testing.assert_allclose(np.array(plain[key]), np.array(ckpt[key]), atol=1e-6)
    # B starts at zero: it has moved, so the comparison above compared trained adapters.
    assert all(np.abs(np.array(v)).max() > 0 for k, v in plain.items() if k.endswith("lora_b"))


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_quantized_model_counts_the_same_parameters_as_dense(bits):
    args = models.ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=256,
                            norm_eps=1e-5, vocab_size=512)
    dense = models.Model(args)
    quantized = models.Model(args)
    nn.quantize(quantized, 64, bits)
    assert models.count_parameters(quantized)[0] == models.count_parameters(dense)[0] == 426624
