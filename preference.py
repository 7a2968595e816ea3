"""Preference losses and their metrics, from per-sequence log-probabilities, as TRL computes them.

Every function takes `Pair`s of arrays of P pairs: log-probabilities summed over each answer's
tokens (the prompt's excluded), and the answers' token counts. DPO (Rafailov et al., 2023)
compares them with a reference model's; ORPO (Hong et al., 2024) needs none. The metrics carry
TRL's names (rewards/chosen, ..., logps/rejected), summed over pairs so that batches, micro-batches
and ranks add up before `report` divides. They are a loss's companions, never differentiated, so
they need no stop_gradient; and each sum a loss also uses is that very array, not a second copy
of it (MLX 0.32's compile fails on an output that repeats a computation of the graph).
"""

from typing import NamedTuple

import mlx.core as mx
from mlx import nn

DPO_LOSSES = ("sigmoid", "ipo", "hinge")


class Pair(NamedTuple):
    """One value per pair, for the chosen answer and the rejected one (arrays of shape P)."""
    chosen: mx.array
    rejected: mx.array


def dpo_losses(logps: Pair, ref_logps: Pair, ntoks: Pair, beta, loss_type="sigmoid", label_smoothing=0.0):
    """(losses_P, rewards) of DPO's `loss_type` (TRL's DPOTrainer, f-divergence reverse KL).

    sigmoid: -log sigmoid(beta delta), delta the chosen log-ratio less the rejected one; with label
    smoothing e, the conservative DPO of TRL's earlier releases: (1 - e) of it plus e of the same
    with the answers swapped. ipo: (delta' - 1 / 2 beta)^2 with each log-ratio divided by its
    answer's tokens (TRL's normalisation). hinge: relu(1 - beta delta). Rewards are beta times the
    summed log-ratios, whatever the loss.
    """
    ratio = Pair(logps.chosen - ref_logps.chosen, logps.rejected - ref_logps.rejected)
    delta_P = ratio.chosen - ratio.rejected
    if loss_type == "sigmoid":
        losses_P = -(1 - label_smoothing) * nn.log_sigmoid(beta * delta_P) \
            - label_smoothing * nn.log_sigmoid(-beta * delta_P)
    elif loss_type == "ipo":
        per_token_P = ratio.chosen / mx.maximum(ntoks.chosen, 1) - ratio.rejected / mx.maximum(ntoks.rejected, 1)
        losses_P = (per_token_P - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses_P = nn.relu(1 - beta * delta_P)
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}")
    return losses_P, Pair(beta * ratio.chosen, beta * ratio.rejected)


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -log 2."""
    return mx.where(x < -0.6931471805599453, mx.log1p(-mx.exp(x)), mx.log(-mx.expm1(x)))


def orpo_odds(logps: Pair, ntoks: Pair, beta):
    """(log sigmoid of the log odds ratio _P, the log odds ratio _P, rewards, mean log-probabilities)
    of ORPO as TRL's ORPOTrainer: on each answer's mean log-probability per token. The loss is the
    chosen answers' NLL less beta times the mean of the first."""
    mean = Pair(logps.chosen / mx.maximum(ntoks.chosen, 1), logps.rejected / mx.maximum(ntoks.rejected, 1))
    log_odds_P = (mean.chosen - mean.rejected) - (log1mexp(mean.chosen) - log1mexp(mean.rejected))
    rewards = Pair(beta * mean.chosen, beta * mean.rejected)
    return nn.log_sigmoid(log_odds_P), log_odds_P, rewards, mean


def dpo(logps: Pair, ref_logps: Pair, ntoks: Pair, beta, loss_type="sigmoid", label_smoothing=0.0, sft_weight=0.0,
        whole=None):
    """(DPO's mean loss, its metric sums) over these P pairs, plus sft_weight times the chosen
    answers' NLL per token (TRL's loss_type [loss_type, "sft"] with loss_weights [1, sft_weight]:
    RPO, Pang et al. 2024, which keeps the chosen answers likely while the margin grows); or, when
    they are part of a batch whose `whole` is (its pairs, its chosen answers' tokens), their share
    of that batch's loss."""
    losses_P, rewards = dpo_losses(logps, ref_logps, ntoks, beta, loss_type, label_smoothing)
    sums = metric_sums(rewards, logps)
    sums.update(nll_sum=-sums["logps/chosen"], chosen_tokens=ntoks.chosen.sum())
    pairs, chosen_tokens = (losses_P.size, mx.maximum(sums["chosen_tokens"], 1)) if whole is None else whole
    loss = losses_P.sum() / pairs
    if sft_weight:
        loss = loss + sft_weight * sums["nll_sum"] / chosen_tokens
    return loss, sums


def orpo(logps: Pair, ntoks: Pair, beta, whole=None):
    """(ORPO's loss, its metric sums) over these P pairs: the chosen answers' NLL per token less
    beta times the mean log sigmoid of the log odds ratio; or, when they are part of a batch
    whose `whole` is (its pairs, its chosen answers' tokens), their share of that batch's loss."""
    ratio_P, log_odds_P, rewards, mean = orpo_odds(logps, ntoks, beta)
    nll_sum, ratio_sum, answer_tokens = -logps.chosen.sum(), ratio_P.sum(), ntoks.chosen.sum()
    pairs, chosen_tokens = (ratio_P.size, mx.maximum(answer_tokens, 1)) if whole is None else whole
    sums = dict(metric_sums(rewards, mean), log_odds_ratio=ratio_sum, log_odds_chosen=log_odds_P.sum(),
                nll_sum=nll_sum, chosen_tokens=answer_tokens)
    return nll_sum / chosen_tokens - beta * ratio_sum / pairs, sums


DPO_SUMS = ("pairs", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected", "nll_sum", "chosen_tokens")
ORPO_SUMS = DPO_SUMS + ("log_odds_ratio", "log_odds_chosen")


def metric_sums(rewards: Pair, logps: Pair):
    """TRL's reward and log-probability metrics, summed over the pairs (their count under 'pairs')."""
    return {"pairs": mx.array(rewards.chosen.size, mx.float32),
            "rewards/chosen": rewards.chosen.sum(), "rewards/rejected": rewards.rejected.sum(),
            "rewards/accuracies": (rewards.chosen > rewards.rejected).astype(mx.float32).sum(),
            "rewards/margins": (rewards.chosen - rewards.rejected).sum(),
            "logps/chosen": logps.chosen.sum(), "logps/rejected": logps.rejected.sum()}


def report(sums):
    """{name: mean} of summed metrics: per pair, and nll_loss (the chosen answers' NLL) per chosen token."""
    pairs = max(float(sums["pairs"]), 1.0)
    out = {k: float(v) / pairs for k, v in sums.items() if k not in ("pairs", "nll_sum", "chosen_tokens")}
    if "nll_sum" in sums:
        out["nll_loss"] = float(sums["nll_sum"]) / max(float(sums["chosen_tokens"]), 1.0)
    return out
