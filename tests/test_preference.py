"""Preference tuning (lora.py --train-mode dpo|orpo): the losses against TRL's own code, the
log-probabilities against transformers, the pair data, training, resume and bad input."""

import os
import re
import shutil
import signal
import subprocess
import sys
from collections import defaultdict
from functools import partial
from types import SimpleNamespace

import mlx.core as mx
from mlx.utils import tree_map
import numpy as np
import pytest
import torch

import chat
import cwk_create_dataset as cwk
import dataset
import lora
import loading
import preference
import trainer
from checkpoints import make_checkpoint, make_tokenizer
from conftest import convert_checkpoint
from hf_checkpoints import make_hf_model
from helpers import (CHATML, LORA, assert_same_bits, finish, read_adapters, start_ranks, write_dataset,
                     write_split)
from utils import UserError, read_jsonl

trl = pytest.importorskip("trl")

BETA = 0.3


# ------------------------------------------------------------------ a tiny batch, in TRL's layout and ours

@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """A tiny transformers model (the policy), another (the reference), and the first converted."""
    root = tmp_path_factory.mktemp("hf_pair")
    policy = make_hf_model(root / "policy", "llama", seed=0)
    make_tokenizer(root / "policy")
    reference = make_hf_model(root / "reference", "llama", seed=1)
    return policy, reference, convert_checkpoint(root / "policy", root / "mlx")


P, T, SEED = 3, 14, 5  # a seed whose pairs the policy ranks both ways
PROMPT_LENGTHS, ANSWER_LENGTHS = [4, 6, 3], [[5, 2], [7, 4], [3, 9]]  # a pair's chosen and rejected answers


def pair_rows():
    """Token rows (P, 2, T) and their answer masks: a prompt shared by a pair's two rows, then each
    answer, then padding (token 0, mask 0)."""
    rng = np.random.default_rng(SEED)
    tokens, mask = np.zeros((P, 2, T), np.int64), np.zeros((P, 2, T), np.float32)
    for p, (n_prompt, answers) in enumerate(zip(PROMPT_LENGTHS, ANSWER_LENGTHS)):
        prompt = rng.integers(3, 300, n_prompt)
        for r, n in enumerate(answers):
            tokens[p, r, :n_prompt + n] = np.concatenate([prompt, rng.integers(3, 300, n)])
            mask[p, r, n_prompt:n_prompt + n] = 1
    return tokens, mask


def hf_token_logps(model, tokens, mask):
    """Per-token log-probabilities (P, 2, T - 1) of the answer tokens under a transformers model,
    0 elsewhere: transformers' own logits, log-softmax and gather."""
    flat = torch.as_tensor(tokens.reshape(-1, T))
    with torch.no_grad():
        logp = torch.log_softmax(model(flat).logits.float(), -1)[:, :-1]
    picked = logp.gather(-1, flat[:, 1:, None])[..., 0] * torch.as_tensor(mask.reshape(-1, T)[:, 1:])
    return picked.reshape(P, 2, T - 1)


@pytest.fixture(scope="module")
def token_logps(hf_pair):
    policy, reference, _ = hf_pair
    tokens, mask = pair_rows()
    return hf_token_logps(policy, tokens, mask), hf_token_logps(reference, tokens, mask), mask


def ours(per_token_P2T):
    """Summed per-sequence log-probabilities as our Pair (float32)."""
    sums = mx.array(per_token_P2T.sum(-1).numpy())
    return preference.Pair(sums[:, 0], sums[:, 1])


def answer_tokens(mask):
    counts = mx.array(mask.sum(-1))
    return preference.Pair(counts[:, 0], counts[:, 1])


def trl_layout(per_token_P2T):
    """TRL's batch order: every chosen row, then every rejected one."""
    return torch.cat([per_token_P2T[:, 0], per_token_P2T[:, 1]])


class Accelerator:
    """What TRL's loss code asks of accelerate on one process: gathers are the identity."""
    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather


def trl_dpo(policy, reference, mask, loss_type, label_smoothing=0.0, sft_weight=None):
    """TRL's DPOTrainer._compute_loss run on these log-probabilities: a stub trainer holding its
    settings, and a stub model that returns them as its fused LM head would (the reference's
    precomputed, as TRL's precompute_ref_log_probs passes them)."""
    completion_mask = torch.as_tensor(np.concatenate([mask[:, 0], mask[:, 1]])).long()
    outputs = SimpleNamespace(log_probs=trl_layout(policy), entropy=torch.zeros(2 * P, T - 1),
                              mean_logits=torch.zeros(2 * P, T - 1), is_top1=torch.zeros(2 * P, T - 1, dtype=bool))
    ref = reference.sum(-1)
    inputs = {"input_ids": torch.zeros(2 * P, T, dtype=torch.long), "attention_mask": torch.ones(2 * P, T),
              "completion_mask": completion_mask, "ref_chosen_logps": ref[:, 0], "ref_rejected_logps": ref[:, 1]}
    stub = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=Accelerator(), aux_loss_enabled=False,
                           precompute_ref_logps=True, ld_alpha=None, f_divergence_type="reverse_kl",
                           loss_types=[loss_type] + (["sft"] if sft_weight else []),
                           loss_weights=[1.0] + ([sft_weight] if sft_weight else []), beta=BETA,
                           label_smoothing=label_smoothing,
                           use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
                           _total_train_tokens=0, _tp_size=1)
    loss = trl.DPOTrainer._compute_loss(stub, lambda **kwargs: outputs, inputs, False)
    return loss.item(), {k: v[0] for k, v in stub._metrics["train"].items()}


DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected")


def assert_close(ours_value, trl_value, name):
    assert abs(ours_value - trl_value) <= 1e-5 * max(1.0, abs(trl_value)), (name, ours_value, trl_value)


@pytest.mark.parametrize("loss_type", preference.DPO_LOSSES)
def test_dpo_losses_and_metrics_are_trls(token_logps, loss_type):
    policy, reference, mask = token_logps
    loss, sums = preference.dpo(ours(policy), ours(reference), answer_tokens(mask), BETA, loss_type)
    trl_loss, trl_metrics = trl_dpo(policy, reference, mask, loss_type)
    assert_close(loss.item(), trl_loss, "loss")
    metrics = preference.report(sums)
    for name in DPO_METRICS:
        assert_close(metrics[name], trl_metrics[name], name)
    assert 0 < metrics["rewards/accuracies"] < 1  # the batch has pairs either way: accuracy is tested


@pytest.mark.parametrize("loss_type", preference.DPO_LOSSES)
def test_dpo_with_an_sft_term_is_trls_sft_loss_weight(token_logps, loss_type):
    """--sft-weight a: TRL's loss_type [loss_type, "sft"] with loss_weights [1, a] (RPO)."""
    policy, reference, mask = token_logps
    loss, sums = preference.dpo(ours(policy), ours(reference), answer_tokens(mask), BETA, loss_type, sft_weight=0.7)
    trl_loss, _ = trl_dpo(policy, reference, mask, loss_type, sft_weight=0.7)
    assert_close(loss.item(), trl_loss, "loss")
    plain, _ = trl_dpo(policy, reference, mask, loss_type)
    nll = -policy[:, 0].sum().item() / mask[:, 0].sum()
    assert_close(preference.report(sums)["nll_loss"], nll, "nll_loss")
    assert abs(trl_loss - plain - 0.7 * nll) < 1e-4  # the term is there, and it is the chosen answers' NLL


def test_label_smoothing_is_conservative_dpo_from_trls_sigmoid(token_logps):
    """TRL 1.x's sigmoid loss has no label smoothing (its earlier releases' conservative DPO): with
    smoothing e, the loss is (1 - e) of TRL's sigmoid loss plus e of it on the pairs swapped."""
    policy, reference, mask = token_logps
    e = 0.2
    loss, sums = preference.dpo(ours(policy), ours(reference), answer_tokens(mask), BETA, "sigmoid", e)
    straight, metrics = trl_dpo(policy, reference, mask, "sigmoid")
    swapped, _ = trl_dpo(policy.flip(1), reference.flip(1), mask[:, ::-1], "sigmoid")
    assert_close(loss.item(), (1 - e) * straight + e * swapped, "loss")
    assert abs(loss.item() - straight) > 1e-3  # smoothing changes it
    assert_close(preference.report(sums)["rewards/margins"], metrics["rewards/margins"], "rewards/margins")


def test_orpo_loss_and_metrics_are_trls(token_logps):
    """TRL's ORPOTrainer.get_batch_loss_metrics and odds_ratio_loss, on a stub whose forward returns
    these answers' mean log-probabilities and the chosen answers' NLL per token."""
    from trl.experimental.orpo import ORPOTrainer

    policy, _, mask = token_logps
    ntoks = torch.as_tensor(mask.sum(-1))
    mean = policy.sum(-1) / ntoks
    nll = -policy[:, 0].sum() / ntoks[:, 0].sum()
    stub = SimpleNamespace(beta=BETA, accelerator=Accelerator(), aux_loss_enabled=False)
    stub.odds_ratio_loss = partial(ORPOTrainer.odds_ratio_loss, stub)
    stub.concatenated_forward = lambda model, batch: (mean[:, 0], mean[:, 1], torch.zeros(1), torch.zeros(1), nll)
    trl_loss, trl_metrics = ORPOTrainer.get_batch_loss_metrics(stub, None, None)
    loss, sums = preference.orpo(ours(policy), answer_tokens(mask), BETA)
    assert_close(loss.item(), trl_loss.item(), "loss")
    metrics = preference.report(sums)
    for name in DPO_METRICS + ("log_odds_ratio", "log_odds_chosen", "nll_loss"):
        assert_close(metrics[name], trl_metrics[name], name)


def test_sequence_logps_equal_transformers(hf_pair, token_logps):
    """Our converted model's log-probabilities of the answer tokens, summed per sequence, are
    transformers' (the mask of target t is the answer mask of token t + 1)."""
    policy, _, mask = token_logps
    tokens, _ = pair_rows()
    model, _, _ = loading.load_model(hf_pair[2])
    inputs, targets = mx.array(tokens[..., :-1]), mx.array(tokens[..., 1:])
    logps, ntoks = trainer.pair_logps(model, inputs, targets, mx.array(mask[..., 1:]))
    expected = policy.sum(-1).numpy()
    np.testing.assert_allclose(np.stack([np.array(logps.chosen), np.array(logps.rejected)], 1), expected, atol=1e-4)
    np.testing.assert_array_equal(np.stack([np.array(ntoks.chosen), np.array(ntoks.rejected)], 1), mask.sum(-1))


# ------------------------------------------------------------------------------------------ pair data

NAMES, RIGHT, WRONG = ["Tom", "Lily", "Ben", "Anna"], ["ball", "cat", "tree", "boat"], ["cake", "dog", "hat", "sun"]


def pairs(n, seed):
    """Pairs whose chosen answer names each child's own thing, the rejected another one."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        i = int(rng.integers(len(NAMES)))
        out.append({"prompt": f"{NAMES[i]} had a", "chosen": f" {RIGHT[i]}.", "rejected": f" {WRONG[i]}."})
    return out


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    for split, n, seed in (("train", 24, 0), ("valid", 8, 1), ("test", 8, 2)):
        write_split(folder, split, pairs(n, seed))
    return str(folder)


def test_string_pairs_count_the_answer_tokens_alone(tiny_llama, pair_data):
    _, tokenizer, _ = loading.load_model(tiny_llama[0])
    data = dataset.load_pairs(pair_data, "train", tokenizer, 2048)
    line = next(iter(read_jsonl(os.path.join(pair_data, "train.jsonl"))))[1]
    inputs, targets, mask = data.batch([0])
    assert inputs.shape[:2] == (1, 2)
    for row, key in enumerate(("chosen", "rejected")):
        counted = [int(t) for t, m in zip(np.array(targets[0, row]), np.array(mask[0, row])) if m]
        full = tokenizer.encode(line["prompt"] + line[key], bos=True, eos=True)
        n_prompt = len(tokenizer.encode(line["prompt"], bos=True))
        assert counted == full[n_prompt:]  # the answer and EOS, nothing of the prompt


def test_conversational_pairs_count_the_answer_turn_alone(tiny_llama, tmp_path):
    _, tokenizer, _ = loading.load_model(tiny_llama[0])
    prompt = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
              {"role": "user", "content": "name a toy"}]
    write_split(tmp_path, "train", [{"prompt": prompt, "chosen": [{"role": "assistant", "content": "a ball"}],
                                     "rejected": [{"role": "assistant", "content": "a cake"}]}])
    data = dataset.load_pairs(str(tmp_path), "train", tokenizer, 2048, CHATML)
    for row, answer in enumerate(("a ball", "a cake")):
        tokens, spans = data.sequences.tokens[row], data.sequences.spans[row]
        assert len(spans) == 1  # the prompt's assistant turn carries no loss
        assert tokenizer.decode(tokens[spans[0][0]:spans[0][1]]).startswith(answer)


@pytest.mark.parametrize("line, message", [
    ({"prompt": "a", "chosen": "b"}, "line 1: missing 'rejected'"),
    ({"prompt": "a", "chosen": "b", "rejected": "b"}, "line 1: 'chosen' and 'rejected' are the same"),
    ({"prompt": "a", "chosen": " ", "rejected": "b"}, "line 1: 'chosen' must be a non-empty string"),
    ({"prompt": "a", "chosen": "b", "rejected": ["c"]}, "must be all strings or all lists of messages"),
    ({"text": "a story"}, r"line 1: a supervised example .*--train-mode dpo needs preference pairs"),
    ({"prompt": "x " * 40, "chosen": "b", "rejected": "c"},
     "line 1: the 'chosen' answer is empty after truncation to --max-seq-length 16"),
])
def test_bad_pair_lines_name_file_and_line(tiny_llama, tmp_path, line, message):
    _, tokenizer, _ = loading.load_model(tiny_llama[0])
    write_split(tmp_path, "train", [line])
    with pytest.raises(UserError, match=message):
        dataset.load_pairs(str(tmp_path), "train", tokenizer, 16)


def test_pairs_given_to_sft_say_which_format_is_which(tiny_llama, pair_data):
    _, tokenizer, _ = loading.load_model(tiny_llama[0])
    with pytest.raises(UserError, match=r"train.jsonl: line 1: a preference pair .*--train-mode sft needs"):
        dataset.load_split(pair_data, "train", tokenizer, 2048, False)


# ---------------------------------------------------------------------------------------- training

def preference_run(model_dir, data, adapter_file, *flags, script=LORA, killed_at=None):
    """lora.py --train-mode in a process of its own (killed while writing the checkpoint of step
    `killed_at`, if given): (exit code, stderr)."""
    kill = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kill_in_checkpoint.py")
    command = [sys.executable, *([kill, str(killed_at)] if killed_at else [script]),
               "--model", model_dir, "--train", "--data", data, "--adapter-file", str(adapter_file),
               "--iters", "12", "--save-every", "4", "--batch-size", "4", "--learning-rate", "1e-2",
               "--lora-layers", "2", "--lora-targets", "all", "--steps-per-eval", "6", "--steps-per-report", "3",
               "--train-mode", "dpo", *flags]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    return done.returncode, done.stderr


def metrics(adapter_file):
    return [r for _, r in read_jsonl(os.path.splitext(str(adapter_file))[0] + ".metrics.jsonl")]


@pytest.mark.parametrize("mode", ["dpo", "orpo"])
def test_short_run_learns_the_preference(tiny_llama, pair_data, tmp_path, mode):
    adapter_file = tmp_path / "a.npz"
    lora.main(["--model", tiny_llama[0], "--train", "--data", pair_data, "--adapter-file", str(adapter_file),
               "--iters", "16", "--batch-size", "4", "--learning-rate", "1e-2", "--lora-layers", "2",
               "--steps-per-eval", "8", "--steps-per-report", "4", "--train-mode", mode, "--beta", "0.5"])
    records = metrics(adapter_file)
    val = [r for r in records if "val_loss" in r]
    assert val[-1]["val_loss"] < val[0]["val_loss"]
    assert val[-1]["val_rewards/accuracies"] > val[0]["val_rewards/accuracies"] or mode == "orpo"
    assert val[-1]["val_rewards/margins"] > val[0]["val_rewards/margins"]
    train = [r for r in records if "train_loss" in r]
    assert {"rewards/chosen", "rewards/rejected", "logps/chosen", "pairs_per_s"} <= set(train[0])
    if mode == "dpo":  # a new adapter's first evaluation is the reference itself: no reward yet
        assert val[0]["val_rewards/chosen"] == 0 and val[0]["val_rewards/margins"] == 0
    else:
        assert {"log_odds_ratio", "nll_loss"} <= set(train[0])
    assert os.path.exists(tmp_path / "a.loss.png")


def conversation_pair(pair, swapped=False):
    """A string pair as TRL's conversational form; swapped: the answers the other way round."""
    chosen, rejected = (pair["rejected"], pair["chosen"]) if swapped else (pair["chosen"], pair["rejected"])
    return {"prompt": [{"role": "user", "content": pair["prompt"]}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def test_conversational_dpo_stops_early_on_the_validation_preference_loss(tiny_llama, tmp_path):
    """Conversational pairs through the model's chat template; validation pairs that prefer the
    other answer, so that training raises their DPO loss: --early-stop 2 ends the run two
    evaluations after the first, and the adapters written are the best evaluation's (the start:
    new adapters, adding nothing)."""
    model_dir = tmp_path / "chatml"
    shutil.copytree(tiny_llama[0], model_dir)
    (model_dir / chat.TEMPLATE_FILE).write_text(CHATML, encoding="utf-8")
    data = tmp_path / "data"
    write_split(data, "train", [conversation_pair(p) for p in pairs(24, 0)])
    write_split(data, "valid", [conversation_pair(p, swapped=True) for p in pairs(8, 0)])
    adapter_file = tmp_path / "a.npz"
    lora.main(["--model", str(model_dir), "--train", "--data", str(data), "--adapter-file", str(adapter_file),
               "--iters", "40", "--batch-size", "4", "--learning-rate", "1e-2", "--lora-layers", "2",
               "--steps-per-eval", "4", "--steps-per-report", "4", "--train-mode", "dpo", "--early-stop", "2"])
    records = metrics(adapter_file)
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [0, 4, 8] and val[0]["val_loss"] < val[1]["val_loss"] < val[2]["val_loss"]
    assert records[-1]["early_stop"] and records[-1]["best_step"] == 0
    b = [v for k, v in read_adapters(adapter_file).items() if k.endswith("lora_b")]
    assert b and not any(v.any() for v in b)


def test_the_validation_loss_is_the_whole_sets_with_an_sft_term(tiny_llama, pair_data, tmp_path):
    """With --sft-weight the loss has two means, over pairs and over chosen tokens; the validation
    loss takes each over the whole set (its batches hold different token counts), as TRL's
    evaluation of one batch would: at the start, where policy and reference agree, it is
    log 2 + a times the validation nll_loss."""
    adapter_file = tmp_path / "a.npz"
    lora.main(split_run_args(tiny_llama[0], pair_data, adapter_file, "dpo", "--sft-weight", "0.5"))
    first = next(r for r in metrics(adapter_file) if "val_loss" in r)
    assert first["val_loss"] == pytest.approx(np.log(2) + 0.5 * first["val_nll_loss"], rel=1e-5)


@pytest.mark.parametrize("kind", ["dora", "full", "qlora"])
def test_dpo_trains_every_kind_of_adapter(tiny_llama, pair_data, tmp_path, kind):
    """DoRA, full fine-tuning (whose reference is the trained blocks' start weights) and LoRA
    over a 4-bit base: the first evaluation is the reference itself, and training moves away."""
    model_dir = tiny_llama[0]
    if kind == "qlora":
        model_dir = convert_checkpoint(os.path.dirname(tiny_llama[0]) + "/torch", tmp_path / "q4", quantize=True,
                                       q_group_size=32)
    flags = () if kind == "qlora" else ("--fine-tune-type", kind)
    adapter_file = tmp_path / "a.npz"
    lora.main(split_run_args(model_dir, pair_data, adapter_file, "dpo", "--learning-rate", "1e-2", "--optimizer",
                             "adam", *flags))
    val = [r for r in metrics(adapter_file) if "val_loss" in r]
    assert val[0]["val_rewards/margins"] == 0 and val[0]["val_loss"] == pytest.approx(np.log(2))
    assert val[-1]["val_rewards/margins"] > 0.1 and val[-1]["val_loss"] < val[0]["val_loss"]


def test_a_reference_model_of_the_same_shape_is_the_reference(tiny_llama, pair_data, tmp_path, capsys):
    """--reference-model: the first evaluation's rewards are beta times the log-ratios to that
    model (another draw of the same shapes and vocabulary), not zero."""
    make_checkpoint(tmp_path / "torch", "llama2", n_layers=2, seed=2)
    other = convert_checkpoint(tmp_path / "torch", tmp_path / "other")
    adapter_file = tmp_path / "a.npz"
    lora.main(split_run_args(tiny_llama[0], pair_data, adapter_file, "dpo", "--reference-model", other,
                             "--beta", "0.2"))
    first = next(r for r in metrics(adapter_file) if "val_loss" in r)
    policy, tokenizer, _ = loading.load_model(tiny_llama[0])
    reference, _, _ = loading.load_model(other)
    valid = dataset.load_pairs(pair_data, "valid", tokenizer, 2048)
    batch = valid.batch(list(range(len(valid))))
    ratio = np.array(trainer.pair_logps(policy, *batch)[0].chosen - trainer.pair_logps(reference, *batch)[0].chosen)
    assert abs(ratio.mean()) > 0.1
    assert first["val_rewards/chosen"] == pytest.approx(0.2 * ratio.mean(), rel=1e-4)
    # --test alone, over the adapters: the test pairs' loss and metrics against the same reference
    capsys.readouterr()
    lora.main(["--model", tiny_llama[0], "--data", pair_data, "--test", "--adapter-file", str(adapter_file),
               "--train-mode", "dpo", "--reference-model", other, "--beta", "0.2"])
    assert re.fullmatch(r"Test loss [0-9.]+, rewards/chosen .*, rewards/accuracies [0-9.]+, .*\.\n",
                        capsys.readouterr().out)


def split_run_args(model_dir, data, adapter_file, mode, *extra):
    return ["--model", model_dir, "--train", "--data", data, "--adapter-file", str(adapter_file), "--iters", "6",
            "--batch-size", "4", "--optimizer", "sgd", "--learning-rate", "0.5", "--lora-layers", "2",
            "--lora-targets", "all", "--steps-per-eval", "3", "--steps-per-report", "3", "--val-batches", "-1", "--train-mode", mode, *extra]


@pytest.mark.parametrize("mode, flags", [("dpo", ("--sft-weight", "0.5")), ("orpo", ())])
def test_micro_batches_and_ranks_train_as_one_process(tiny_llama, pair_data, tmp_path, mode, flags):
    """A batch of 4 pairs whole, in 2 micro-batches, and over 2 ranks x 2 micro-batches of 1 pair:
    the same adapters and the same metrics (the NLL terms' means, over the chosen tokens, and
    ORPO's odds-ratio mean, over pairs, each taken over the whole batch; DPO's reference
    log-probabilities computed half by each rank). SGD, whose steps scale with the gradient:
    Adam's would hide a share of the loss taken over the wrong count."""
    runs = {"whole": (), "accumulated": ("--grad-accumulation-steps", "2")}
    for name, extra in runs.items():
        lora.main(split_run_args(tiny_llama[0], pair_data, tmp_path / name / "a.npz", mode, *flags, *extra))
    results = finish(start_ranks(split_run_args(tiny_llama[0], pair_data, tmp_path / "ranks" / "a.npz", mode,
                                                *flags, "--grad-accumulation-steps", "2"), tmp_path))
    assert [code for code, _ in results] == [0, 0], results[0][1] + results[1][1]
    expected, expected_log = read_adapters(tmp_path / "whole" / "a.npz"), metrics(tmp_path / "whole" / "a.npz")
    scale = max(np.abs(v).max() for v in expected.values())
    for name in ("accumulated", "ranks"):
        got = read_adapters(tmp_path / name / "a.npz")
        assert max(np.abs(got[k] - expected[k]).max() for k in expected) <= 1e-4 * scale, name
        for ours, theirs in zip(metrics(tmp_path / name / "a.npz"), expected_log):
            for key, value in theirs.items():
                if key.startswith(("val_", "rewards/", "logps/", "log_odds", "nll", "train_loss")):
                    assert ours[key] == pytest.approx(value, rel=1e-4, abs=1e-5), (name, key)


def test_reference_is_the_base_model_with_adapters_off(tiny_llama, pair_data):
    """The default reference is the model as training starts: with new adapters, the base model's
    log-probabilities bit for bit (the adapters add exactly nothing yet). The batches carry them,
    computed once for the batches of the plan (NaN for pairs of none), and training that moves
    the adapters after leaves them as they were."""
    args = lora.parse_args(["--model", tiny_llama[0], "--train-mode", "dpo", "--lora-layers", "2"])
    model, tokenizer, _ = loading.load_model(tiny_llama[0])
    base, _, _ = loading.load_model(tiny_llama[0])
    data = dataset.load_pairs(pair_data, "valid", tokenizer, 2048)
    lora.adapt(model, args, lora.ResumePoint(None, {}))
    lora.attach_reference_logps(args, model, tokenizer, [(data, [[0, 1, 2, 3], [5]])])
    model.update(tree_map(lambda p: p + 0.05, model.trainable_parameters()))
    for indices in ([0, 1, 2, 3], [5]):
        *batch, carried_P2 = data.batch(indices)
        expected = trainer.pair_logps(base, *batch)[0]
        np.testing.assert_array_equal(np.array(carried_P2), np.stack([expected.chosen, expected.rejected], 1))
        moved = trainer.pair_logps(model, *batch)[0]
        assert np.abs(np.array(moved.chosen) - np.array(expected.chosen)).max() > 1e-3
    assert np.isnan(np.array(data.batch([4])[-1])).all()  # in no batch of the run: no reference computed


def test_a_resume_with_another_reference_or_loss_is_refused(tiny_llama, pair_data, tmp_path):
    """The reference's log-probabilities are computed anew on resume: a resume whose reference
    (here: adapters to start from that the run did not have) or loss settings differ would train
    another objective from the middle on, so it is refused, one line."""
    start = tmp_path / "start.npz"
    lora.main(split_run_args(tiny_llama[0], pair_data, start, "dpo"))
    killed = tmp_path / "killed" / "a.npz"
    assert preference_run(tiny_llama[0], pair_data, killed, killed_at=8)[0] == -signal.SIGKILL
    for flags, message in [(("--resume-adapter-file", str(start)), "made with DPO reference the base model, "
                                                                   "this run has the adapters of SHA-256"),
                           (("--beta", "0.2"), "made with --beta 0.1, this run has 0.2"),
                           (("--sft-weight", "1"), "made with --sft-weight 0.0, this run has 1.0")]:
        code, err = preference_run(tiny_llama[0], pair_data, killed, "--resume", "latest", *flags)
        assert code == 2 and re.fullmatch(rf"error: .*step-00000004.safetensors: checkpoint was {message}.*\n",
                                          err.splitlines(keepends=True)[-1]), err


def test_a_reference_that_overflows_is_one_line_naming_the_pair(tiny_llama, pair_data):
    """A reference that overflows on a token of the second pair alone (its embedding inf): one line
    naming that pair."""
    model, tokenizer, _ = loading.load_model(tiny_llama[0])
    data = dataset.load_pairs(pair_data, "valid", tokenizer, 2048)
    first, second = (set(np.array(data.batch([i])[0]).ravel().tolist()) for i in (0, 1))
    token = min(second - first)
    table = model.tok_embeddings
    table.weight = mx.where(mx.arange(table.weight.shape[0])[:, None] == token, mx.inf, table.weight)
    with pytest.raises(UserError, match=r"valid.jsonl: pair 2: the reference model gives its answers the "
                                        r"log-probabilities \[.*\], not finite numbers"):
        trainer.reference_logps(model, [[0, 1]], data.batch, len(data), data.path)


def test_dpo_run_killed_and_resumed_is_bit_identical(tiny_llama, pair_data, tmp_path):
    reference, killed = tmp_path / "reference" / "a.npz", tmp_path / "killed" / "a.npz"
    flags = ("--lora-dropout", "0.1", "--grad-accumulation-steps", "2")
    assert preference_run(tiny_llama[0], pair_data, reference, *flags)[0] == 0
    assert preference_run(tiny_llama[0], pair_data, killed, *flags, killed_at=8)[0] == -signal.SIGKILL
    assert preference_run(tiny_llama[0], pair_data, killed, *flags, "--resume", "latest")[0] == 0
    assert_same_bits(read_adapters(killed), read_adapters(reference))
    assert metrics(killed)[-1] == metrics(reference)[-1]
    code, err = preference_run(tiny_llama[0], pair_data, killed, *flags, "--resume", "latest", "--iters", "16",
                               "--train-mode", "orpo")
    assert code == 2 and "checkpoint was made with --train-mode dpo, this run has orpo" in err


@pytest.fixture(scope="module")
def other_shape(tmp_path_factory):
    root = tmp_path_factory.mktemp("other_shape")
    make_checkpoint(root / "torch", "llama2", n_layers=3, seed=1)
    return convert_checkpoint(root / "torch", root / "mlx")


@pytest.mark.parametrize("flags, message", [
    (("--beta", "0"), "--beta must be"),
    (("--beta", "-1"), "--beta must be"),
    (("--beta", "nan"), "--beta must be"),
    (("--train-mode", "sft", "--beta", "0.5"), "--beta goes with --train-mode dpo or orpo, not sft"),
    (("--dpo-loss", "ipo", "--label-smoothing", "0.1"), "--label-smoothing goes with --dpo-loss sigmoid"),
    (("--train-mode", "orpo", "--dpo-loss", "hinge"), "--dpo-loss goes with --train-mode dpo, not orpo"),
    (("--label-smoothing", "0.5"), "--label-smoothing must be"),
    (("--sft-weight", "nan"), "--sft-weight must be a finite number"),
    (("--train-mode", "orpo", "--sft-weight", "1"), "--sft-weight goes with --train-mode dpo, not orpo"),
    (("--train-mode", "sft"), "line 1: a preference pair .*; --train-mode sft needs"),
    (("--reference-model", "OTHER"), "--reference-model .*: not the shape of"),
])
def test_bad_preference_input_is_one_line_and_writes_nothing(tiny_llama, other_shape, pair_data, tmp_path, flags,
                                                              message):
    flags = tuple(other_shape if f == "OTHER" else f for f in flags)
    code, err = preference_run(tiny_llama[0], pair_data, tmp_path / "out" / "a.npz", *flags)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) <= 3 and "Traceback" not in err, err  # the error line (after "Loading model" lines)
    assert re.search(message, lines[-1]), lines[-1]
    assert not os.path.exists(tmp_path / "out") or not os.listdir(tmp_path / "out")


def test_sft_data_given_to_dpo_says_which_format_is_which(tiny_llama, tmp_path):
    code, err = preference_run(tiny_llama[0], write_dataset(tmp_path / "sft"), tmp_path / "a.npz")
    assert code == 2 and "a supervised example" in err and "--train-mode dpo needs preference pairs" in err
    assert not os.path.exists(tmp_path / "a.npz")


# ---------------------------------------------------------------- cwk_create_dataset.py --format preference

def test_created_pairs_reject_another_answer_of_the_module_never_a_test_one():
    """The rejected answer is another object's of the package's module the object is in (pkg.a
    for pkg.a.sub.f), so that pairs also differ at the submodule: siblings alone share it."""
    examples = [{"package": "pkg", "group": f"pkg.{module}.{name}", "path": f"pkg.{module}.{name}",
                 "signature": "()", "text": f"{name} does {module} things.", "short": name}
                for module in ("a", "b", "a.sub") for name in ("f", "g", "h", "k", "m", "n")]
    splits = cwk.with_rejected(cwk.split_examples(examples, 0.3, 0.2, 0), 0)
    test_paths = {e["path"] for e in splits["test"]}
    assert splits["test"] and all(splits.values())
    parents = set()
    for pairs_of_split in splits.values():
        for example in pairs_of_split:
            line = cwk.format_example(example, "preference")
            rejected = example["rejected"]
            assert rejected["path"] not in test_paths and rejected["group"] != example["group"]
            assert rejected["path"].split(".")[:2] == example["path"].split(".")[:2]
            parents.add(rejected["path"].rpartition(".")[0] == example["path"].rpartition(".")[0])
            assert line["chosen"][0]["content"] != line["rejected"][0]["content"]
            assert line["rejected"][0]["content"].startswith(rejected["path"])
    assert parents == {True, False}  # siblings, and objects of another submodule of the module
