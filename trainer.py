"""The training loop shared by LoRA fine-tuning and pretraining, and its full-state checkpoints.

What makes a run resumable to the same bits: the data order and every random
draw (dropout) are pure functions of (seed, step), so a checkpoint needs only the
trainable weights, the optimizer state (which holds the step and the learning-rate
schedule position) and the step. A checkpoint is one safetensors file written
atomically; the newest `keep` are kept.
"""

import contextlib
import functools
import glob
import hashlib
import json
import math
import os
import platform
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from collections.abc import Callable
from typing import Optional

import blas
import utils
from utils import UserError

import distributed
import loading
import ops
import preference
import settings
from settings import option

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_map_with_path, tree_unflatten

CHECKPOINT_FORMAT = 1
BASE_KEY = "base_sha256"  # the run meta key of the base weights' digest: a resume must be on the same base


@dataclass
class TrainingSettings(settings.Settings):
    """Training loop (the settings of `train`, shared by every script that trains; each may change the defaults)."""
    batch_size: int = option(4, "examples per step (over all ranks when distributed)", at_least=1)
    grad_accumulation_steps: int = option(1, "micro-batches per step: the step of the whole batch in about "
                                             "1/N of its activation memory", at_least=1)
    iters: int = option(1000, "training steps", at_least=1)
    learning_rate: float = option(1e-5, "peak learning rate (after any warm-up)", above=0)
    warmup: int = option(0, "steps of linear warm-up from 0", at_least=0)
    seed: int = option(0, "random seed (data order, initialization, dropout)", at_least=0, below=2**63)
    resume: Optional[str] = option(None, "resume from a full-state checkpoint: its path, or 'latest' of this run")
    max_bad_steps: int = option(5, "stop after this many non-finite steps in a row", at_least=1)
    val_batches: int = option(25, "validation batches per evaluation", at_least=1, special={-1: "the whole set"})
    steps_per_report: int = option(10, "steps between training-loss reports", at_least=1)
    steps_per_eval: int = option(200, "steps between validation runs", at_least=1)
    save_every: int = option(100, "steps between saves of the result and of a full-state checkpoint", at_least=1)
    keep_checkpoints: int = option(3, "full-state checkpoints to keep", at_least=1)
    early_stop: Optional[int] = option(None, "stop after this many evaluations without a lower validation loss; "
                                             "the result saved is then the best evaluation's", at_least=1)

    def check(self):
        if self.warmup > self.iters:
            raise UserError(f"--warmup {self.warmup} is more than --iters {self.iters}")

    def micro_batch_size(self, world):
        """Examples of one micro-batch of one rank; the batch must split evenly into them."""
        parts = world.size * self.grad_accumulation_steps
        if self.batch_size % parts:
            raise UserError(f"--batch-size {self.batch_size} does not split into {world.size} rank(s) x "
                            f"{self.grad_accumulation_steps} micro-batch(es): make it a multiple of {parts}")
        return self.batch_size // parts


def check_memory(args, batch_size, seq_len, grad_checkpoint=False):
    """A UserError when a training batch of `batch_size` x `seq_len` tokens would need more
    activation memory than MLX may use: better said now than by the kernel's OOM killer.

    Per layer, backward keeps the attention probabilities (N x T x T a row) and about ten
    activations of the model's width and four of the feed-forward's; with
    --grad-checkpoint, one layer's at a time.
    """
    per_layer = batch_size * seq_len * (args.n_heads * seq_len + 10 * args.dim + 4 * args.hidden_dim) * 4
    need = per_layer * (1 if grad_checkpoint else args.n_layers)
    limit = mx.get_memory_limit()
    if need > limit:
        raise UserError(f"a batch of {batch_size} examples of up to {seq_len} tokens needs about "
                        f"{need / 2**30:.1f} GiB of activations, more than the {limit / 2**30:.1f} GiB MLX may "
                        "use: lower --batch-size or --max-seq-length"
                        + ("" if grad_checkpoint else ", or add --grad-checkpoint"))


def step_seed(seed, step, rank=0):
    """The random seed of one training step of one rank: reproducible after a resume."""
    return (seed * 1_000_003 + step + rank * 2 ** 40) % (2 ** 63)


@functools.lru_cache(maxsize=2)  # asked every step; the same for a whole epoch
def epoch_order(n, seed, epoch):
    """The shuffle of n items in one epoch: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def loss_fn(model, inputs_BT, targets_BT, mask_BT):
    """Mean cross-entropy over the counted targets (mask 1), and their number."""
    logits_BTV = model(inputs_BT).astype(mx.float32)
    ce_BT = ops.cross_entropy(logits_BTV, targets_BT) * mask_BT
    ntoks = mask_BT.sum()
    return ce_BT.sum() / mx.maximum(ntoks, 1), ntoks


# ----------------------------------------------------------------------------- objectives

@dataclass(frozen=True)
class Objective:
    """What training minimizes, over batches of one layout.

    loss(model, norm, *batch) -> (loss, n, sums): with norm None, the batch's mean loss over its
    n units (tokens, pairs); when the batch is a part (a micro-batch, a rank's rows) of a whole
    of which norm(*whole) is `norm`, its share of the whole's mean loss, so that the shares add up
    to it. sums: {name: sum over the batch} for each name in `sums`, which report(totals) turns
    into the metrics to log. unit: what n counts (the speed is logged as {unit}_per_s). state:
    the arrays, beyond the model's, that the loss reads (a compiled step must be told of them).
    """
    loss: Callable
    norm: Callable
    sums: tuple = ()
    report: Callable = lambda totals: {}
    unit: str = "tokens"
    state: tuple = ()

    def zero_sums(self):
        return {name: mx.array(0.0) for name in self.sums}


def _sft_loss(model, norm, inputs_BT, targets_BT, mask_BT):
    loss, ntoks = loss_fn(model, inputs_BT, targets_BT, mask_BT)
    return (loss if norm is None else loss * ntoks / norm), ntoks, {}


SFT = Objective(_sft_loss, norm=lambda inputs_BT, targets_BT, mask_BT: mx.maximum(mask_BT.sum(), 1))


def sequence_logps(model, inputs_NT, targets_NT, mask_NT):
    """Each row's log-probability of its counted targets (mask 1), summed (N), and their count (N)."""
    logits_NTV = model(inputs_NT).astype(mx.float32)
    logp_NT = -ops.cross_entropy(logits_NTV, targets_NT) * mask_NT
    return logp_NT.sum(axis=1), mask_NT.sum(axis=1)


def pair_logps(model, inputs_P2T, targets_P2T, mask_P2T):
    """(log-probabilities, token counts) of the answers of P pairs (row 0 chosen, 1 rejected):
    one forward over their 2P sequences."""
    T = inputs_P2T.shape[-1]
    logps_N, ntoks_N = sequence_logps(model, inputs_P2T.reshape(-1, T), targets_P2T.reshape(-1, T),
                                      mask_P2T.reshape(-1, T))
    logps_P2, ntoks_P2 = logps_N.reshape(-1, 2), ntoks_N.reshape(-1, 2)
    return preference.Pair(logps_P2[:, 0], logps_P2[:, 1]), preference.Pair(ntoks_P2[:, 0], ntoks_P2[:, 1])


def _pairs(inputs_P2T, *rest):
    return mx.array(inputs_P2T.shape[0], mx.float32)


def dpo_objective(beta, loss_type="sigmoid", label_smoothing=0.0, sft_weight=0.0):
    """DPO's `loss_type` (and sft_weight of the chosen answers' NLL), on batches that carry their
    pairs' reference log-probabilities (ref_logps_P2, from reference_logps): the reference costs
    no pass in the step."""
    def loss(model, norm, inputs_P2T, targets_P2T, mask_P2T, ref_logps_P2):
        logps, ntoks = pair_logps(model, inputs_P2T, targets_P2T, mask_P2T)
        ref_logps = preference.Pair(ref_logps_P2[:, 0], ref_logps_P2[:, 1])
        loss, sums = preference.dpo(logps, ref_logps, ntoks, beta, loss_type, label_smoothing, sft_weight, norm)
        return loss, _pairs(inputs_P2T), sums

    return Objective(loss, norm=_pairs_and_chosen_tokens, sums=preference.DPO_SUMS, report=preference.report,
                     unit="pairs")


def orpo_objective(beta):
    """ORPO: the chosen answers' NLL and the odds-ratio term, no reference."""
    def loss(model, norm, *batch):
        logps, ntoks = pair_logps(model, *batch)
        loss, sums = preference.orpo(logps, ntoks, beta, norm)
        return loss, _pairs(*batch), sums

    return Objective(loss, norm=_pairs_and_chosen_tokens, sums=preference.ORPO_SUMS, report=preference.report,
                     unit="pairs")


def _pairs_and_chosen_tokens(inputs_P2T, targets_P2T, mask_P2T, *rest):
    """The pairs and the chosen answers' tokens of a whole batch: the means of a preference loss
    and of its NLL term are over these."""
    return mx.stack([_pairs(inputs_P2T), mx.maximum(mask_P2T[:, 0].sum(), 1)])


def reference_logps(reference, plan, batch_of, n_pairs, where):
    """The log-probabilities a reference model gives the answers of n_pairs pairs, as an array
    n_pairs x 2 (chosen, rejected), float32, in eval mode: computed once before training, as TRL's
    precompute_ref_log_probs, so that a DPO step is the policy's passes alone (and the default
    reference, the policy as training starts, needs no copy of its start weights). plan: the
    batches of pair indices the run will use, each made by batch_of(indices); the pairs of no
    batch get NaN. Distributed, each rank computes every world-size-th batch and the ranks add
    their arrays. A non-finite value is a UserError naming `where` (the split) and the pair."""
    world = distributed.current()
    out_N2 = np.zeros((n_pairs, 2), np.float32)
    with evaluating(reference):
        for i, indices in enumerate(plan):
            if i % world.size == world.rank:
                logps = pair_logps(reference, *batch_of(indices))[0]
                out_N2[indices] = np.array(mx.stack([logps.chosen, logps.rejected], axis=1), np.float32)
    if world.size > 1:
        out_N2 = np.array(world.all_sum(mx.array(out_N2)))
    used = np.zeros(n_pairs, bool)
    used[[i for indices in plan for i in indices]] = True
    if not np.isfinite(out_N2[used]).all():
        bad = int(np.flatnonzero(used & ~np.isfinite(out_N2).all(axis=1))[0])
        raise UserError(f"{where}: pair {bad + 1}: the reference model gives its answers the log-probabilities "
                        f"{out_N2[bad].tolist()}, not finite numbers (a reference in float16 that overflows?)")
    out_N2[~used] = np.nan
    return out_N2


@contextlib.contextmanager
def evaluating(model):
    """`model` in eval mode (no dropout) for the block; its training mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def evaluate(model, batches, objective=SFT):
    """The mean loss over an iterable of batches (see evaluate_with_metrics)."""
    return evaluate_with_metrics(model, batches, objective)[0]


def evaluate_with_metrics(model, batches, objective):
    """(the objective's loss over all the batches as one, its metrics) over an iterable of
    batches, without dropout (the model's training mode is restored after): each batch's share
    of the whole's mean, as in a step's micro-batches. Distributed, each rank takes every
    world-size-th batch and the sums are added across ranks."""
    world = distributed.current()
    batches = list(batches)
    norm = functools.reduce(mx.add, (objective.norm(*batch) for batch in batches))
    totals = dict(loss=mx.array(0.0), **objective.zero_sums())
    with evaluating(model):
        for i, batch in enumerate(batches):
            if i % world.size != world.rank:
                continue
            share, _, sums = objective.loss(model, norm, *batch)
            totals = added(totals, dict(loss=share, **sums))
            mx.eval(totals)
    totals = summed_across_ranks(world, totals) if world.size > 1 else totals
    return totals.pop("loss").item(), objective.report(totals)


def added(a, b):
    """Two dicts of arrays with the same keys, added key by key."""
    return {k: a[k] + b[k] for k in a}


def learning_rate_schedule(peak, iters, warmup=0, cosine=True, end=0.0):
    """Linear warm-up from 0 over `warmup` steps (none if 0), then `peak` held, or
    decayed along a cosine to `end` at step `iters`."""
    main = optim.cosine_decay(peak, max(iters - warmup, 1), end) if cosine else peak
    if warmup <= 0:
        return main
    hold = main if callable(main) else (lambda step: mx.array(peak))
    return optim.join_schedules([optim.linear_schedule(0.0, peak, warmup), hold], [warmup])


OPTIMIZERS = ("adam", "adamw", "sgd", "adafactor", "muon")


def make_optimizer(name, learning_rate, weight_decay=0.0):
    """One of mlx.optimizers by its name in OPTIMIZERS, on `learning_rate` (a number or a
    schedule), with decoupled `weight_decay` (Adam has none: its settings refuse one).
    Adafactor runs on the learning rate given, not on its own relative step size."""
    if name == "adam":
        return optim.Adam(learning_rate)
    if name == "adafactor":
        return optim.Adafactor(learning_rate, relative_step=False, scale_parameter=False, weight_decay=weight_decay)
    kinds = {"adamw": optim.AdamW, "sgd": optim.SGD, "muon": optim.Muon}
    return kinds[name](learning_rate, weight_decay=weight_decay)


def assign_in_place(tree, values):
    """Put the leaves of `values` into the containers of `tree`, which has its structure.

    An optimizer's state must change in its own dicts: the compiled step tracks those,
    and MultiOptimizer.state is a fresh dict around its optimizers' on every access, so
    replacing its entries would change nothing.
    """
    for key in range(len(tree)) if isinstance(tree, list) else tree:
        if isinstance(tree[key], (dict, list)):
            assign_in_place(tree[key], values[key])
        else:
            tree[key] = values[key]


def make_train_step(model, optimizer, objective=SFT, clip_norm=None, accumulation=1):
    """One training step of `objective` (SFT by default) on a global batch: loss, gradients
    (optionally clipped), and an update applied only if the loss, every gradient and everything
    the update makes are finite. A bad step leaves weights and optimizer as they were.
    Returns (loss, n, finite, sums): n the units the loss is a mean over, sums the objective's.

    One process and one micro-batch: one compiled function. Otherwise each rank (distributed.py)
    takes its rows of the batch in `accumulation` micro-batches, evaluated one after another
    so that one micro-batch's activations are alive at a time; each contributes the gradient
    of its share of the whole batch's mean loss, and one all_sum adds the ranks' shares:
    the gradient of the whole batch's mean loss, float summation order aside."""
    world = distributed.current()

    def update(loss, ntoks, grads):
        if clip_norm is not None:
            grads, _ = optim.clip_grad_norm(grads, clip_norm)
        finite = mx.isfinite(loss)
        for _, g in tree_flatten(grads):
            finite = finite & mx.isfinite(g).all()
        old_params = model.trainable_parameters()
        old_opt = tree_map(lambda x: x, optimizer.state)  # new containers, same arrays
        optimizer.update(model, grads)
        # An update can overflow too, in the weights or in the optimizer's moments (g^2).
        for _, p in tree_flatten(model.trainable_parameters()) + tree_flatten(optimizer.state):
            finite = finite & mx.isfinite(p).all()
        keep = lambda new, old: mx.where(finite, new, old)  # noqa: E731
        model.update(tree_map(keep, model.trainable_parameters(), old_params))
        assign_in_place(optimizer.state, tree_map(keep, optimizer.state, old_opt))
        return loss, ntoks, finite

    # Create the optimizer state now so that compile sees its arrays from the start.
    optimizer.init(model.trainable_parameters())
    state = [model.state, optimizer.state, mx.random.state]
    read = state + list(objective.state)
    value_and_grad = nn.value_and_grad(model, objective.loss)
    if world.size == 1 and accumulation == 1:
        def whole_step(*batch):
            (loss, n, sums), grads = value_and_grad(model, None, *batch)
            return (*update(loss, n, grads), sums)

        return mx.compile(whole_step, inputs=read, outputs=state)

    share_and_grad = mx.compile(lambda *args: value_and_grad(model, *args), inputs=read, outputs=state)
    compiled_update = mx.compile(update, inputs=state, outputs=state)

    def step(*batch):
        norm = objective.norm(*batch)  # what the whole batch's mean is over, every rank's rows
        totals, grads = dict(loss=mx.array(0.0), n=mx.array(0.0), **objective.zero_sums()), None
        for start, end in micro_batches(batch[0].shape[0], world, accumulation):
            (part, n, sums), g = share_and_grad(norm, *(rows[start:end] for rows in batch))
            totals = added(totals, dict(loss=part, n=n, **sums))
            grads = g if grads is None else tree_map(mx.add, grads, g)
            mx.eval(totals, grads)
        if grads is None:  # a short last batch left this rank no rows: it adds nothing
            grads = tree_map(mx.zeros_like, model.trainable_parameters())
        if world.size > 1:
            totals, grads = summed_across_ranks(world, totals, grads)
        loss, n = totals.pop("loss"), totals.pop("n")
        return (*compiled_update(loss, n, grads), totals)

    return step


def micro_batches(n_rows, world, accumulation):
    """(start, end) rows of this rank's micro-batches of a batch of `n_rows`: the rows split
    as evenly as they go into world.size x accumulation parts (a short last batch leaves
    some empty, and those are skipped)."""
    parts = world.size * accumulation
    bounds = [n_rows * i // parts for i in range(parts + 1)]
    mine = range(world.rank * accumulation, (world.rank + 1) * accumulation)
    return [(bounds[i], bounds[i + 1]) for i in mine if bounds[i + 1] > bounds[i]]


def summed_across_ranks(world, totals, grads=None):
    """(totals, grads) added over every rank, in one all_sum of one float32 vector: totals a dict
    of scalars, grads a tree (or None, then totals alone are returned)."""
    names, flat = list(totals), tree_flatten(grads) if grads is not None else []
    vector = mx.concatenate([mx.stack([totals[k].astype(mx.float32) for k in names])]
                            + [g.astype(mx.float32).reshape(-1) for _, g in flat])
    vector = world.all_sum(vector)
    totals = {k: vector[i] for i, k in enumerate(names)}
    if grads is None:
        return totals
    out, at = [], len(names)
    for name, g in flat:
        out.append((name, vector[at:at + g.size].reshape(g.shape).astype(g.dtype)))
        at += g.size
    return totals, tree_unflatten(out)


# ----------------------------------------------------------------------------- checkpoints

class Checkpoints:
    """Full-state checkpoints `step-NNNNNNNN.safetensors` in one folder, newest `keep` kept."""

    def __init__(self, folder, keep=3):
        self.folder, self.keep = folder, keep

    def path(self, step):
        return os.path.join(self.folder, f"step-{step:08d}.safetensors")

    def all(self):
        return sorted(glob.glob(os.path.join(self.folder, "step-*.safetensors")))

    def latest(self):
        paths = self.all()
        if not paths:
            raise UserError(f"{self.folder}: no checkpoint to resume from")
        return paths[-1]

    def save(self, step, model, optimizer, meta):
        arrays = {f"model.{k}": v for k, v in tree_flatten(model.trainable_parameters())}
        arrays.update({f"optimizer.{k}": v for k, v in tree_flatten(optimizer.state)})
        bad = [k for k, v in arrays.items() if mx.issubdtype(v.dtype, mx.floating) and not mx.isfinite(v).all().item()]
        if bad:
            raise UserError(f"{self.path(step)}: not written, {bad[0]} has non-finite values")
        meta = dict(meta, step=step, format=CHECKPOINT_FORMAT)
        os.makedirs(self.folder, exist_ok=True)
        for stale in glob.glob(os.path.join(self.folder, ".step-*")):
            os.unlink(stale)  # the temporary of a write that a crash interrupted
        utils.atomic_save_arrays(self.path(step), arrays, metadata={"mlx_lora": json.dumps(meta)})
        for old in self.all()[:-self.keep]:
            os.unlink(old)


def load_checkpoint(path):
    """(arrays, meta) of a checkpoint file; a damaged file is a UserError."""
    if not os.path.exists(path):
        raise UserError(f"{path}: checkpoint not found")
    try:
        arrays, metadata = mx.load(path, return_metadata=True)
        meta = utils.parse_json(metadata["mlx_lora"], f"{path}: metadata")
    except (KeyError, ValueError, RuntimeError) as e:
        raise UserError(f"{path}: not a readable checkpoint ({e})")
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a checkpoint of this toolkit")
    for key in ("step", "bad_in_a_row", "bad_total", "evals_since_best"):
        value = meta.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UserError(f"{path}: not a readable checkpoint ('{key}' is {value!r})")
    best = (meta.get("best_step"), meta.get("best_val_loss"))
    if best != (None, None) and not (isinstance(best[0], int) and isinstance(best[1], (int, float))
                                     and not isinstance(best[0], bool) and math.isfinite(best[1])):
        raise UserError(f"{path}: not a readable checkpoint (best step and loss {best!r})")
    return arrays, meta


def resume(checkpoints, which, run_meta, iters):
    """(path, arrays, meta) of the checkpoint `which` ("latest" or a path), refused when it was
    made with other `run_meta` settings (they decide the data order: a resume must replay it)
    or when it is already at or past step `iters`."""
    path = checkpoints.latest() if which == "latest" else which
    arrays, meta = load_checkpoint(path)
    for key, value in run_meta.items():
        if key == BASE_KEY:
            if meta.get(key) not in (None, value):  # None: a checkpoint from before it was kept
                raise UserError(f"{path}: checkpoint was made on another base model (weights SHA-256 "
                                f"{meta[key][:12]}..., this run's {value[:12]}...)")
        elif meta.get(key) != value:  # a key is a flag's name, or a phrase
            name = key if " " in key else f"--{key.replace('_', '-')}"
            raise UserError(f"{path}: checkpoint was made with {name} {meta.get(key)}, this run has {value}")
    if meta.get("stopped_early"):
        raise UserError(f"{path}: this run stopped early at step {meta['step']} (--early-stop), with the adapters "
                        f"of step {meta.get('best_step')}: nothing left to resume")
    if meta["step"] >= iters:
        raise UserError(f"{path}: checkpoint is at step {meta['step']}, and --iters is {iters}: nothing left "
                        "to train (raise --iters to train on)")
    print(f"Resuming from {path} at step {meta['step']}", file=sys.stderr)
    return path, arrays, meta


def restore(path, arrays, model, optimizer):
    """Put a checkpoint's weights into `model` and its state into `optimizer`."""
    optimizer.init(model.trainable_parameters())

    def take(prefix, key, like):
        name = f"{prefix}.{key}"
        if name not in arrays:
            raise UserError(f"{path}: checkpoint does not fit this run (missing {name})")
        if arrays[name].shape != like.shape:
            raise UserError(f"{path}: checkpoint does not fit this run ({name} has shape "
                            f"{tuple(arrays[name].shape)}, expected {tuple(like.shape)})")
        return arrays[name].astype(like.dtype)

    weights = tree_map_with_path(lambda k, v: take("model", k, v), model.trainable_parameters())
    model.update(weights)
    assign_in_place(optimizer.state, tree_map_with_path(lambda k, v: take("optimizer", k, v), optimizer.state))
    expected = len(tree_flatten(model.trainable_parameters())) + len(tree_flatten(optimizer.state))
    if len(arrays) != expected:
        raise UserError(f"{path}: checkpoint does not fit this run ({len(arrays)} arrays, expected {expected})")


# ----------------------------------------------------------------------------- manifest

def sha256_file(path):
    """The file's SHA-256, computed once per version of the file (a run asks for it more than once)."""
    stat = os.stat(path)
    return _sha256_file(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256_file(path, size, mtime_ns):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def toolkit_version():
    """The git commit of this checkout when there is one, else 'unknown'."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_manifest(path, inputs, settings):
    """Record what a run was made from: input hashes, settings, versions, command line
    (rank 0's to write)."""
    if not distributed.current().is_writer:
        return
    utils.write_json(path, {
        "command": [sys.executable] + sys.argv,
        "settings": settings,
        "inputs": {name: {"path": p, "sha256": sha256_file(p)} for name, p in sorted(inputs.items())},
        "versions": {"python": platform.python_version(), "mlx": mx.__version__,
                     "mlx_lora": toolkit_version(), "blas": blas.PATH},
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })


# ----------------------------------------------------------------------------- the loop

class MetricsLog:
    """Metrics as JSON lines, and a loss plot.

    On resume from `resume_step`, the records up to that step are kept: a run killed
    after its last checkpoint logged steps that the resumed run does again, and a kill
    in mid-write may have left a torn last line.
    """

    def __init__(self, path, plot_path, resume_step=None):
        self.path, self.plot_path = path, plot_path
        self.records = []
        self._file = None
        if not distributed.current().is_writer:  # rank 0 writes the log
            return
        if resume_step is not None and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        break  # torn by a kill: nothing after it was written whole
                    if record.get("step", 0) <= resume_step:
                        self.records.append(record)
        with utils.atomic_write(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.records)
        self._file = open(path, "a", encoding="utf-8")

    def log(self, **record):
        self.records.append(record)
        if self._file is not None:
            try:
                self._file.write(json.dumps(record) + "\n")
                self._file.flush()
            except OSError as e:
                self._failed(e)

    def close(self):
        if self._file is not None:
            try:
                self._file.close()
            except OSError as e:
                self._failed(e)

    def _failed(self, error):
        """A full disk, say: named by the file, not by the errno alone; the log is closed for good."""
        file, self._file = self._file, None
        with contextlib.suppress(OSError):
            file.close()
        raise UserError(f"{self.path}: not written ({error.strerror or error})")

    def plot(self):
        if self._file is None:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for label, key in (("train", "train_loss"), ("valid", "val_loss")):
            points = [(r["step"], r[key]) for r in self.records if key in r]
            if points:
                ax.plot(*zip(*points), marker="o" if label == "valid" else None, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        accuracy = [(r["step"], r["val_rewards/accuracies"]) for r in self.records if "val_rewards/accuracies" in r]
        if accuracy:  # preference tuning: how often the chosen answer gets the higher reward
            right = ax.twinx()
            right.plot(*zip(*accuracy), color="tab:green", marker="s", label="valid reward accuracy")
            right.set_ylabel("reward accuracy")
            right.set_ylim(0, 1)
            right.legend(loc="upper right")
        ax.legend(loc="upper left" if accuracy else "best")
        with utils.atomic_write(self.plot_path) as f:
            fig.savefig(f, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)


class StopRequested:
    """Catches SIGINT and SIGTERM: the loop finishes its step, checkpoints and exits."""

    def __init__(self):
        self.signal = None

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint", file=sys.stderr)

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)


class Interrupted(Exception):
    """Training stopped by a signal after writing a checkpoint."""

    def __init__(self, signum, checkpoint):
        super().__init__(checkpoint)
        self.signum, self.checkpoint = signum, checkpoint

    def report(self, script):
        """Say where the run stopped and the command that resumes it; the exit code, 128 + signal."""
        command = shlex.join(["python", script, *sys.argv[1:], "--resume", "latest"])
        print(f"Stopped by {signal.Signals(self.signum).name}; checkpoint {self.checkpoint}. Resume with:\n"
              f"  {command}", file=sys.stderr)
        return 128 + self.signum


def peak_memory_gb():
    """MLX's allocator peak; on the CPU, where that is not tracked, the resident peak."""
    peak = mx.get_peak_memory()
    if not peak:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return peak / 1e9


class EarlyStop:
    """--early-stop N: the best validation loss so far, its step, and the evaluations since,
    kept in every checkpoint so that a resumed run goes on counting."""

    def __init__(self, patience, resumed):
        self.patience = patience
        self.best_step, self.best_loss = resumed.get("best_step"), resumed.get("best_val_loss")
        self.since_best = resumed.get("evals_since_best", 0)

    def improved(self, step, loss):
        """Count an evaluation; whether its loss is the lowest so far (strictly)."""
        if self.best_loss is None or loss < self.best_loss:
            self.best_step, self.best_loss, self.since_best = step, loss, 0
            return True
        self.since_best += 1
        return False

    @property
    def exhausted(self):
        return self.since_best >= self.patience

    def meta(self):
        return dict(best_step=self.best_step, best_val_loss=self.best_loss, evals_since_best=self.since_best)


def stop_requested(stop, world):
    """The signal that asked any rank to stop, or None: every rank stops after the same step (one
    that went on would wait for the others' gradients forever), and rank 0 writes the checkpoint."""
    if world.size == 1:
        return stop.signal
    return world.all_max(mx.array(stop.signal or 0)).item() or None


def say_how_split(settings, world, resumed):
    """One line on how each step's batch is split, and whether a resumed run splits it as
    its checkpoint's run did (the same batches and updates either way; another split adds
    the same terms in another order, so the bits may differ)."""
    parts = f"{world.size} rank(s) x {settings.grad_accumulation_steps} micro-batch(es)"
    if world.size > 1 or settings.grad_accumulation_steps > 1:
        print(f"Each step: {settings.batch_size} examples in {parts} of "
              f"{settings.micro_batch_size(world)}", file=sys.stderr)
    if resumed:
        was = (resumed.get("world_size", 1), resumed.get("grad_accumulation_steps", 1))
        if was != (world.size, settings.grad_accumulation_steps):
            print(f"note: the checkpoint's run split each batch into {was[0]} rank(s) x {was[1]} micro-batch(es), "
                  f"this one into {parts}: the same steps, summed in another order (not bit-identical)",
                  file=sys.stderr)


SHOWN = {"rewards/accuracies": "reward accuracy", "rewards/margins": "reward margin"}  # on progress lines


def described(metrics):
    """The metrics a progress line shows, where an objective has them (the log keeps them all)."""
    return "".join(f", {label} {metrics[key]:.3f}" for key, label in SHOWN.items() if key in metrics)


def train(model, optimizer, step_fn, batch_for_step, evaluate, settings: TrainingSettings, checkpoints, log,
          save_outputs, checkpoint_meta, resumed=None, objective=SFT):
    """Run steps 1 .. settings.iters, or from after the step of the `resumed` checkpoint's meta.

    batch_for_step(step) -> batch arrays; evaluate() -> validation loss, or (loss, {metric:
    value}) whose metrics are logged with "val_" before their names, or None; `objective` (SFT
    by default) is step_fn's, whose sums are logged by their names with the training loss;
    save_outputs() writes the user-facing result (adapters, weights) every
    save_every steps and at the end, beside a full-state checkpoint whose meta is
    `checkpoint_meta` plus the step and the bad-step counts. With --early-stop it writes
    the result at each new best evaluation instead, and the run may end before
    settings.iters (the checkpoint then says so).
    """
    from tqdm import tqdm

    world = distributed.current()
    split = dict(world_size=world.size, grad_accumulation_steps=settings.grad_accumulation_steps)
    say_how_split(settings, world, resumed)
    resumed = resumed or {}
    start_step = resumed.get("step", 0)
    bad_in_a_row, bad_total = resumed.get("bad_in_a_row", 0), resumed.get("bad_total", 0)
    early = EarlyStop(settings.early_stop, resumed) if settings.early_stop else None

    def checkpoint(step, **more):
        if step == bad_total:  # every step so far skipped: the result would be the untrained start
            raise UserError(f"all {step} steps were non-finite and skipped: nothing trained, nothing saved; "
                            f"try a lower --learning-rate (now {settings.learning_rate})")
        if world.is_writer:
            if early is None:
                save_outputs()
            checkpoints.save(step, model, optimizer, dict(checkpoint_meta, **split, **(early.meta() if early else {}),
                                                          bad_in_a_row=bad_in_a_row, bad_total=bad_total, **more))

    def validate(step):
        """Evaluate and log; with --early-stop, write the result at a new best. Whether the run
        should stop early."""
        t0 = time.perf_counter()
        if (result := evaluate()) is None:
            return False
        val, metrics = result if isinstance(result, tuple) else (result, {})
        best = early is not None and early.improved(step, val)
        tqdm.write(f"Iter {step}: val loss {val:.3f}{described(metrics)}, val took {time.perf_counter() - t0:.2f}s"
                   + (" (best so far)" if best else ""), file=sys.stderr)
        log.log(step=step, val_loss=val, **{f"val_{k}": v for k, v in metrics.items()},
                **({"best": True} if best else {}))
        if best and world.is_writer:
            save_outputs()
        return early is not None and early.exhausted

    if start_step == 0:
        validate(0)
    def fresh_window():
        return {"loss": 0.0, "n": 0, "steps": 0, "sums": objective.zero_sums()}

    window = fresh_window()
    tic = time.perf_counter()

    bar = tqdm(range(start_step + 1, settings.iters + 1), desc="train", unit="step", file=sys.stderr,
               dynamic_ncols=True, initial=start_step, total=settings.iters,
               disable=None if world.is_writer else True)  # no bar in a log, nor on other ranks
    with StopRequested() as stop:
        for step in bar:
            mx.random.seed(step_seed(settings.seed, step, world.rank))
            loss, n, finite, sums = step_fn(*batch_for_step(step))
            mx.eval(loss, n, finite, sums, model.trainable_parameters(), optimizer.state)
            if finite.item():
                bad_in_a_row, n = 0, int(n.item())
                window["loss"] += loss.item() * n
                window["n"] += n
                window["steps"] += 1
                window["sums"] = added(window["sums"], sums)
            else:
                # A parameter that is not finite spoils every step to come: say which, now.
                loading.explain_non_finite(model, f"the loss of step {step}")
                bad_in_a_row, bad_total = bad_in_a_row + 1, bad_total + 1
                tqdm.write(f"step {step}: non-finite loss or gradient; step skipped "
                           f"({bad_in_a_row} in a row, {bad_total} in all)", file=sys.stderr)
                log.log(step=step, skipped=True)
                if bad_in_a_row >= settings.max_bad_steps:
                    bar.close()
                    raise UserError(f"{bad_in_a_row} non-finite steps in a row at step {step}: "
                                    f"try a lower --learning-rate (now {settings.learning_rate})")
            if step % settings.steps_per_report == 0 or step == settings.iters:
                elapsed = time.perf_counter() - tic
                speed = f"{objective.unit}_per_s"
                metrics = objective.report(window["sums"]) if window["steps"] else {}
                record = dict(step=step, train_loss=window["loss"] / max(window["n"], 1),
                              learning_rate=float(optimizer.learning_rate.item()),
                              it_per_s=window["steps"] / elapsed, **{speed: window["n"] / elapsed},
                              peak_memory_gb=peak_memory_gb(), skipped_steps=bad_total, **metrics)
                tqdm.write(f"Iter {step}: train loss {record['train_loss']:.3f}{described(metrics)}, "
                           f"lr {record['learning_rate']:.3e}, {record['it_per_s']:.2f} it/s, "
                           f"{record[speed]:.1f} {objective.unit}/s, peak mem {record['peak_memory_gb']:.2f} GB",
                           file=sys.stderr)
                log.log(**record)
                window, tic = fresh_window(), time.perf_counter()
            if step % settings.steps_per_eval == 0 or step == settings.iters:
                t0 = time.perf_counter()
                if validate(step):
                    checkpoint(step, stopped_early=True)
                    log.log(step=step, early_stop=True, best_step=early.best_step)
                    bar.close()
                    print(f"Stopped early at step {step}: no lower validation loss in {early.patience} "
                          f"evaluation(s); the result saved is step {early.best_step}'s (val loss "
                          f"{early.best_loss:.3f})", file=sys.stderr)
                    return
                tic += time.perf_counter() - t0  # keep evaluation out of the training speed
            if step % settings.save_every == 0 or step == settings.iters:
                checkpoint(step)
            if (signum := stop_requested(stop, world)) is not None:
                if step % settings.save_every != 0 and step != settings.iters:
                    checkpoint(step)
                bar.close()
                raise Interrupted(signum, checkpoints.path(step))
    bar.close()
