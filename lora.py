"""Fine-tune a converted LLaMA/Mistral model with LoRA or QLoRA, test it, generate with it.

    python lora.py --model mlx_model --train --data data/
    python lora.py --model mlx_model --test
    python lora.py --model mlx_model --prompt "Q: What is ReLU in mlx?"
"""

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import utils  # noqa: F401  (fast BLAS before mlx.core)
from utils import UserError, read_jsonl

import mlx.core as mx

import adapters
import chat
import dataset
import distributed
import generate
import models
import preference
import settings
import trainer
from loading import DEFAULT_MODEL, explain_non_finite, load_model, weights_file
from settings import option, redefault

DESCRIPTION = "LoRA / QLoRA fine-tuning, testing and generation."


@dataclass
class LoraSettings(trainer.TrainingSettings):
    model: str = option(DEFAULT_MODEL, "converted model folder (config.json, weights, tokenizer); default: "
                                       "SmolLM2-135M-Instruct, which setup.sh fetches and converts")
    compute_dtype: str = option("auto", "dtype to compute in; auto = float32 on the CPU, the stored dtype on a GPU; "
                                        "bfloat16 on a CPU with AMX: the frozen weights' products in bfloat16 on "
                                        "its tiles, the rest float32",
                                choices=["auto", "float32", "float16", "bfloat16"])
    # Generation
    prompt: Optional[str] = option(None, "generate from this prompt", flags=["-p"], text=True, allow_empty=True)
    chat: bool = option(False, "render --prompt as one user turn through the model's chat template, "
                               "print the reply and stop at the end of the turn")
    system: Optional[str] = option(None, "with --chat, a system message before the user's", text=True)
    num_tokens: int = option(100, "tokens to generate at most", flags=["--max-tokens", "-n"], at_least=1)
    temp: float = option(0.8, "sampling temperature; 0 = greedy", at_least=0)
    top_p: float = option(1.0, "nucleus sampling: keep the smallest set of tokens with this mass",
                          above=0, at_most=1)
    top_k: int = option(0, "sample from the k likeliest tokens only", at_least=1, special={0: "every token"})
    min_p: float = option(0.0, "sample only tokens at least this fraction as likely as the likeliest",
                          at_least=0, below=1)
    repetition_penalty: float = option(1.0, "divide the positive logits (multiply the negative ones) of tokens "
                                            "seen in the last --repetition-context-size by this; 1 = off",
                                       above=0)
    repetition_context_size: int = option(20, "tokens (prompt included) the repetition penalty looks back on",
                                          at_least=1)
    write_every: int = option(1, "print generated text every this many tokens", at_least=1)
    # Training
    train: bool = option(False, "fine-tune with LoRA")
    data: str = option("data/", "folder with train.jsonl, valid.jsonl, test.jsonl")
    lora_layers: int = option(16, "number of final layers to adapt", at_least=1)
    lora_rank: int = option(8, "rank r of the LoRA matrices", at_least=1)
    lora_alpha: float = option(16.0, "LoRA alpha; the update is scaled by alpha / rank", above=0)
    lora_dropout: float = option(0.0, "dropout on the LoRA input during training", at_least=0, below=1)
    lora_targets: str = option("wq,wv", "comma-separated linears to adapt (wq,wk,wv,wo,w1,w2,w3) or 'all'")
    fine_tune_type: str = option("lora", "lora: low-rank adapters; dora: LoRA with a trained magnitude per output "
                                         "row (DoRA, as PEFT); full: every weight of the last --lora-layers blocks "
                                         "(the adapter file holds them, and a model folder STEM-model is written)",
                                 choices=list(models.ADAPTER_TYPES))
    max_seq_length: int = option(2048, "longer examples are truncated (with a warning)", at_least=2)
    mask_prompt: bool = option(False, "loss on the completion only (needs prompt/completion data)")
    lr_schedule: str = option("constant", "learning-rate schedule after warm-up", choices=["constant", "cosine"])
    optimizer: str = option("adam", "optimizer (mlx.optimizers)", choices=trainer.OPTIMIZERS)
    weight_decay: float = option(0.0, "decoupled weight decay (adamw, sgd, adafactor, muon)", at_least=0)
    grad_checkpoint: bool = option(False, "recompute activations in backward to save memory")
    resume_adapter_file: Optional[str] = option(None, "start training from these adapter weights (weights only)")
    adapter_file: str = option("adapters.npz", "where adapters are saved and loaded from (loading: also a PEFT "
                                               "adapter folder)")
    epochs: Optional[int] = option(None, "train for this many passes over the training set (ceil(examples / "
                                         "batch size) steps each) instead of --iters", at_least=1)
    # Preference tuning
    train_mode: str = option("sft", "sft: supervised; dpo: direct preference optimization, against a reference "
                                    "model; orpo: odds-ratio preference optimization, no reference (dpo and orpo "
                                    "train on pairs: 'prompt', 'chosen', 'rejected')", choices=["sft", "dpo", "orpo"])
    beta: float = option(0.1, "dpo: how far the model may move from the reference (DPO's beta, IPO's tau); "
                              "orpo: the weight (lambda) of the odds-ratio term", above=0)
    dpo_loss: str = option("sigmoid", "dpo: the loss of the reward margin, as TRL's loss_type",
                           choices=list(preference.DPO_LOSSES))
    label_smoothing: float = option(0.0, "dpo with the sigmoid loss: the chance that a pair's preference is wrong "
                                         "(conservative DPO)", at_least=0, below=0.5)
    sft_weight: float = option(0.0, "dpo: add this times the chosen answers' NLL per token to the loss (RPO; TRL's "
                                    "loss_type [..., 'sft'] with this loss weight), which keeps the chosen answers "
                                    "likely as the margin grows", at_least=0)
    reference_model: Optional[str] = option(None, "dpo: another converted model folder as the reference (default: "
                                                  "this model as training starts, its new adapters adding nothing)")
    # Test
    test: bool = option(False, "report test loss and perplexity")
    test_batches: int = option(500, "test batches", at_least=1, special={-1: "the whole set"})
    # The training loop's settings, with this script's defaults
    learning_rate: float = redefault(trainer.TrainingSettings, "learning_rate", 1e-5)
    save_every: int = redefault(trainer.TrainingSettings, "save_every", 100)
    steps_per_eval: int = redefault(trainer.TrainingSettings, "steps_per_eval", 200)
    val_batches: int = redefault(trainer.TrainingSettings, "val_batches", 25)

    def check(self):
        super().check()
        models.parse_targets(self.lora_targets)
        if (self.chat or self.system is not None) and self.prompt is None:
            raise UserError("--chat and --system go with --prompt")
        if self.system is not None and not self.chat:
            raise UserError("--system goes with --chat")
        if self.weight_decay and self.optimizer == "adam":
            raise UserError("--weight-decay needs an optimizer that decays: adam has none, adamw is adam with it")
        self.check_train_mode()

    def check_train_mode(self):
        """A flag of one training mode given with another is an error, not silently unused."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, modes in MODE_FLAGS.items():
            if getattr(self, name) != defaults[name] and self.train_mode not in modes:
                raise UserError(f"--{name.replace('_', '-')} goes with --train-mode {' or '.join(modes)}, "
                                f"not {self.train_mode}")
        if self.label_smoothing and self.dpo_loss != "sigmoid":
            raise UserError(f"--label-smoothing goes with --dpo-loss sigmoid, not {self.dpo_loss}")
        if self.test and not self.train and self.train_mode == "dpo" and self.reference_model is None:
            raise UserError("--test with --train-mode dpo needs --train (its reference is the model as training "
                            "starts) or --reference-model")

    def adapter_config(self):
        return models.AdapterConfig(layers=self.lora_layers, targets=models.parse_targets(self.lora_targets),
                                    rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout,
                                    type=self.fine_tune_type)

    def training_settings(self):
        """The training loop's settings alone: what the trainer is given."""
        return settings.subset(trainer.TrainingSettings, self)


# The flags that only some training modes use.
MODE_FLAGS = {"beta": ("dpo", "orpo"), "dpo_loss": ("dpo",), "label_smoothing": ("dpo",),
              "reference_model": ("dpo",), "sft_weight": ("dpo",),
              "mask_prompt": ("sft",)}


def parse_args(argv=None):
    """Settings from the command line over a --config YAML file over the defaults."""
    return settings.parse(LoraSettings, argv, DESCRIPTION)


def evaluate(model, data, batch_size, num_batches):
    """The mean loss over the first `num_batches` batches of a split (-1: all)."""
    return evaluate_with_metrics(model, data, batch_size, num_batches, trainer.SFT)[0]


def evaluate_with_metrics(model, data, batch_size, num_batches, objective):
    """(mean loss, metrics) of `objective` over the first `num_batches` batches of a split (-1: all)."""
    return trainer.evaluate_with_metrics(model, (data.batch(indices) for indices in
                                                 evaluation_plan(data, batch_size, num_batches)), objective)


def evaluation_plan(data, batch_size, num_batches):
    """The batches of a split that an evaluation of `num_batches` (-1: all) takes."""
    plan = dataset.batch_plan(data, batch_size)
    return plan if num_batches < 0 else plan[:num_batches]


def training_batches_drawn(args, data):
    """The batches of the training split that steps 1..--iters draw: every one once an epoch is whole."""
    plan = dataset.batch_plan(data, args.batch_size)
    if args.iters >= len(plan):
        return plan
    return [plan[dataset.training_batch_order(len(plan), args.seed, step - 1)] for step in range(1, args.iters + 1)]


def load_data(args, split, tokenizer):
    """A split as --train-mode reads it: examples for sft, preference pairs for dpo and orpo."""
    template = chat.load_template(args.model)
    if args.train_mode == "sft":
        return dataset.load_split(args.data, split, tokenizer, args.max_seq_length, args.mask_prompt, template)
    return dataset.load_pairs(args.data, split, tokenizer, args.max_seq_length, template, args.train_mode)


def objective_of(args):
    """What --train-mode minimizes (DPO's batches carry their reference log-probabilities)."""
    if args.train_mode == "sft":
        return trainer.SFT
    if args.train_mode == "orpo":
        return trainer.orpo_objective(args.beta)
    return trainer.dpo_objective(args.beta, args.dpo_loss, args.label_smoothing, args.sft_weight)


def attach_reference_logps(args, model, tokenizer, plans):
    """DPO: give each split's pairs their reference log-probabilities, once, for the batches of
    its plan (plans: [(pairs, batches the run takes)]). The reference is --reference-model,
    loaded here and let go after, or else `model` as it is now (call this before training moves
    it: new adapters add nothing yet, resumed ones make TRL's "ref" adapter)."""
    reference = load_reference(args, model, tokenizer) if args.reference_model else model
    for pairs, plan in plans:
        tic = time.perf_counter()
        pairs.reference_logps = trainer.reference_logps(reference, plan, pairs.batch, len(pairs), pairs.path)
        print(f"Reference log-probabilities of {pairs.path}: {sum(map(len, plan))} pairs in "
              f"{time.perf_counter() - tic:.1f}s", file=sys.stderr)


def load_reference(args, model, tokenizer):
    """--reference-model, refused unless it has this model's vocabulary and shapes."""
    reference, ref_tokenizer, _ = load_model(args.reference_model, None, args.compute_dtype)
    where = f"--reference-model {args.reference_model}"
    if ref_tokenizer.vocab_size != tokenizer.vocab_size or any(
            ref_tokenizer.encode(text) != tokenizer.encode(text) for text in VOCABULARY_PROBES):
        raise UserError(f"{where}: another vocabulary than {args.model}'s ({ref_tokenizer.vocab_size} tokens, "
                        f"this model {tokenizer.vocab_size}, or other tokens for the same text)")
    for field in SHAPE_FIELDS:  # the model's own settings: its parameters may carry adapters already
        ours, theirs = getattr(model.args, field), getattr(reference.args, field)
        if ours != theirs:
            raise UserError(f"{where}: not the shape of {args.model}: {field} is {theirs} there, {ours} here")
    return reference


VOCABULARY_PROBES = ("The quick brown fox jumps over the lazy dog.", "naïve café, 日本語 🙂 <|im_start|> 1234")
# What makes two models' parameters the same shapes (quantization aside: a reference may differ there).
SHAPE_FIELDS = ("model_type", "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim")


def training_outputs(adapter_file):
    """Every file training writes beside the adapters, the adapters first."""
    stem = os.path.splitext(adapter_file)[0]
    return [adapter_file] + [stem + suffix for suffix in (".json", ".metrics.jsonl", ".loss.png", ".manifest.json")]


def check_training_outputs(adapter_file):
    """The adapter path must be writable as a file, checked before anything loads."""
    if os.path.splitext(adapter_file)[1] not in (".npz", ".safetensors"):
        raise UserError(f"--adapter-file {adapter_file}: the name must end in .npz or .safetensors")
    parent = os.path.dirname(os.path.abspath(adapter_file))
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise UserError(f"{adapter_file}: {parent} is not a folder")
    for path in training_outputs(adapter_file):
        if os.path.isdir(path):
            raise UserError(f"{path}: a folder is in the way of an output file")


def steps_of_epochs(args):
    """--iters for --epochs: ceil(examples / batch size) steps an epoch, the training set's
    examples counted before anything loads (each line of train.jsonl is one)."""
    if "iters" in args.given:
        raise UserError("--iters and --epochs are two ways to say how long to train: give one")
    n = sum(1 for _ in read_jsonl(os.path.join(args.data, "train.jsonl")))
    if n == 0:
        raise UserError(f"{os.path.join(args.data, 'train.jsonl')}: no training examples")
    steps = -(-n // args.batch_size) * args.epochs
    if args.warmup > steps:
        raise UserError(f"--warmup {args.warmup} is more than the {steps} steps of --epochs {args.epochs}")
    print(f"{args.epochs} epoch(s) of {n} examples in batches of {args.batch_size}: {steps} steps", file=sys.stderr)
    return steps


@dataclass
class ResumePoint:
    """Where a run starts: its checkpoints, what a checkpoint must match, and the checkpoint
    resumed from (trainer.resume's path, arrays and meta) or None."""
    checkpoints: trainer.Checkpoints
    run_meta: dict
    path: Optional[str] = None
    arrays: Optional[dict] = None
    meta: Optional[dict] = None
    adapter_config: Optional[models.AdapterConfig] = None  # the resumed run's


def resume_point(args):
    """The ResumePoint of this run, read before anything loads; a checkpoint of another
    --train-mode is refused."""
    checkpoints = trainer.Checkpoints(os.path.splitext(args.adapter_file)[0] + "-checkpoints", args.keep_checkpoints)
    base = trainer.sha256_file(weights_file(args.model))
    point = ResumePoint(checkpoints, {"seed": args.seed, "batch_size": args.batch_size, trainer.BASE_KEY: base,
                                      **preference_meta(args)})
    if args.resume:
        resumed = trainer.resume(checkpoints, args.resume, point.run_meta, args.iters)
        if resumed:
            point.path, point.arrays, point.meta = resumed
            if (mode := point.meta.get("train_mode", "sft")) != args.train_mode:
                raise UserError(f"{point.path}: checkpoint was made with --train-mode {mode}, this run has "
                                f"{args.train_mode}")
            point.adapter_config = models.AdapterConfig.from_json(point.meta.get("lora"), point.path)
    return point


def preference_meta(args):
    """What a preference run's checkpoint must share with its resume, beyond the data order: the
    loss's settings and, for DPO, which model the reference is (its log-probabilities are
    computed anew on resume)."""
    if args.train_mode == "sft":
        return {}
    meta = {name: getattr(args, name) for name, modes in MODE_FLAGS.items()
            if args.train_mode in modes and name != "reference_model"}
    if args.train_mode == "dpo":
        meta["DPO reference"] = (
            f"--reference-model with weights SHA-256 {trainer.sha256_file(weights_file(args.reference_model))}"
            if args.reference_model else
            f"the adapters of SHA-256 {trainer.sha256_file(args.resume_adapter_file)} (--resume-adapter-file)"
            if args.resume_adapter_file else "the base model")
    return meta


def adapt(model, args, start: ResumePoint):
    """Apply the adapters (or unfreeze the blocks) to train, from --resume-adapter-file's weights if
    given; returns their configuration."""
    if start.adapter_config is not None:
        check_resumed_adapters(args, start, model)
    adapter_config = models.apply_lora(model, start.adapter_config or args.adapter_config())
    if args.resume_adapter_file:
        adapters.load_weights(model, args.resume_adapter_file)
    model.grad_checkpoint = args.grad_checkpoint
    total, trainable = models.count_parameters(model)
    print(f"Parameters: {total / 1e6:.3f}M total, {trainable / 1e6:.3f}M trainable "
          f"({100 * trainable / total:.3f}%)", file=sys.stderr)
    return adapter_config


def run_training(model, data, args, start: ResumePoint, adapter_config, objective):
    """Train the adapted model on `objective` (or resume), save; returns an exit code (non-zero
    when interrupted)."""
    stem = os.path.splitext(args.adapter_file)[0]
    optimizer = trainer.make_optimizer(args.optimizer, trainer.learning_rate_schedule(
        args.learning_rate, args.iters, args.warmup, cosine=args.lr_schedule == "cosine"), args.weight_decay)
    step_fn = trainer.make_train_step(model, optimizer, objective, accumulation=args.grad_accumulation_steps)
    if start.arrays is not None:
        trainer.restore(start.path, start.arrays, model, optimizer)
    trainer.write_manifest(stem + ".manifest.json",
                           {"weights": weights_file(args.model), **{f"data.{s}": d.path for s, d in data.items()}},
                           dataclasses.asdict(args))
    plan = dataset.batch_plan(data["train"], args.batch_size)
    resumed = start.meta or {}
    log = trainer.MetricsLog(stem + ".metrics.jsonl", stem + ".loss.png", resume_step=resumed.get("step"))
    model.train()
    try:
        trainer.train(
            model, optimizer, step_fn,
            batch_for_step=lambda step: data["train"].batch(
                plan[dataset.training_batch_order(len(plan), args.seed, step - 1)]),
            evaluate=lambda: evaluate_with_metrics(model, data["valid"], args.batch_size, args.val_batches, objective),
            settings=args.training_settings(), checkpoints=start.checkpoints, log=log,
            save_outputs=lambda: adapters.save(model, args.adapter_file, adapter_config),
            checkpoint_meta=dict(start.run_meta, lora=adapter_config.to_json(), train_mode=args.train_mode),
            resumed=resumed, objective=objective)
    except trainer.Interrupted as stop:
        return stop.report("lora.py")
    finally:
        log.close()
        model.eval()
    log.plot()
    print(f"Saved adapters to {args.adapter_file} (metrics {log.path}, plot {log.plot_path})", file=sys.stderr)
    if adapter_config.type == "full" and distributed.current().is_writer:
        import fuse  # the export's formats, for this case alone

        fuse.main(["--model", args.model, "--adapter-file", args.adapter_file, "--save-path", stem + "-model",
                   "--force"])
    return 0


# Each AdapterConfig field and the flag that sets it.
ADAPTER_FLAGS = {"layers": "lora_layers", "targets": "lora_targets", "rank": "lora_rank", "alpha": "lora_alpha",
                 "dropout": "lora_dropout", "type": "fine_tune_type"}


def check_resumed_adapters(args, start, model):
    """A resumed run trains the checkpoint's adapters: a flag given now that says otherwise is an
    error, not silently overruled."""
    asked = dataclasses.replace(args.adapter_config(), layers=min(args.lora_layers, len(model.layers)),
                                targets=model.names.resolve_targets(args.adapter_config().targets))
    for field, name in ADAPTER_FLAGS.items():
        ours, theirs = getattr(asked, field), getattr(start.adapter_config, field)
        if name in args.given and ours != theirs:
            shown = ",".join(theirs) if field == "targets" else theirs
            raise UserError(f"{start.path}: the checkpoint trains --{name.replace('_', '-')} {shown}, this run "
                            "asks otherwise: drop the flag to resume, or start a new run")


def run_digests(args, data):
    """{what: SHA-256} of what every rank of a run must share: base weights, data and settings."""
    shared = {k: v for k, v in dataclasses.asdict(args).items() if k != "resume"}
    return {"base model weights": trainer.sha256_file(weights_file(args.model)),
            "training data": hashlib.sha256(b"".join(bytes.fromhex(trainer.sha256_file(d.path))
                                                     for d in data.values())).hexdigest(),
            "settings": hashlib.sha256(json.dumps(shared, sort_keys=True, default=str).encode()).hexdigest()}


def adapters_to_apply(adapter_file):
    """The adapter file --test and --prompt apply, or None for the base model: the
    default file may be missing, a file named explicitly may not."""
    if os.path.exists(adapter_file):
        return adapter_file
    if adapter_file != LoraSettings.adapter_file:
        raise UserError(f"{adapter_file}: adapter file not found")
    print(f"note: no {adapter_file}; using the base model without adapters", file=sys.stderr)
    return None


def main(argv=None):
    args = parse_args(argv)
    if not (args.train or args.test or args.prompt is not None):
        raise UserError("nothing to do: give --train, --test and/or --prompt")
    world = distributed.init()  # several ranks when mlx.launch or mpirun started this
    args.micro_batch_size(world)
    mx.random.seed(args.seed)
    if args.model == DEFAULT_MODEL and not os.path.isdir(DEFAULT_MODEL):
        raise UserError(f"{DEFAULT_MODEL}: the default model is not here yet: run setup.sh (it fetches and "
                        "converts it), or give --model")
    if not args.train:
        return use_model(args, adapters_to_apply(args.adapter_file))
    # Every output is checked, and a resume point read, before anything loads.
    check_training_outputs(args.adapter_file)
    if args.epochs is not None:
        args.iters = steps_of_epochs(args)
    if args.resume_adapter_file and not os.path.isfile(args.resume_adapter_file):
        raise UserError(f"{args.resume_adapter_file}: adapter file not found")
    claim = utils.claimed_output(*training_outputs(args.adapter_file)) if world.is_writer else contextlib.nullcontext()
    with claim:
        return use_model(args, None, resume_point(args))


def use_model(args, adapter_file, resume=None):
    """Load the model, then train, test and generate as asked; returns an exit code."""
    print(f"Loading model {args.model}", file=sys.stderr)
    model, tokenizer, _ = load_model(args.model, adapter_file, args.compute_dtype,
                                     generation_only=not (args.train or args.test))

    test_set = load_test_set(args, model, tokenizer) if args.test else None  # its defects before a long training
    if args.train:
        if args.fine_tune_type != "full":  # the targets are the family's: known now, before the data
            model.names.resolve_targets(args.adapter_config().targets)
        data = {split: load_data(args, split, tokenizer) for split in ("train", "valid")}
        if len(data["train"]) == 0:
            raise UserError(f"{data['train'].path}: no training examples")
        if len(data["valid"]) == 0:
            raise UserError(f"{data['valid'].path}: no validation examples")
        trainer.check_memory(model.args, sequences_per_example(args) * args.micro_batch_size(distributed.current()),
                             max(data["train"].lengths), args.grad_checkpoint)
        distributed.current().check_agreement(run_digests(args, data))
        adapter_config = adapt(model, args, resume)
    if args.train_mode == "dpo" and (args.train or args.test):  # before training: the default reference is the start
        plans = [] if not args.train else [
            (data["train"], training_batches_drawn(args, data["train"])),
            (data["valid"], evaluation_plan(data["valid"], args.batch_size, args.val_batches))]
        if test_set is not None:
            plans.append((test_set, evaluation_plan(test_set, args.batch_size, args.test_batches)))
        attach_reference_logps(args, model, tokenizer, plans)
    objective = objective_of(args)
    if args.train:
        code = run_training(model, data, args, resume, adapter_config, objective)
        if code:
            return code

    if args.test:
        test_loss, metrics = evaluate_with_metrics(model, test_set, args.batch_size, args.test_batches, objective)
        if not math.isfinite(test_loss):
            explain_non_finite(model, "the test loss")
        if args.train_mode == "sft":
            print(f"Test loss {test_loss:.3f}, Test ppl {math.exp(min(test_loss, 700)):.3f}.")
        else:
            print(f"Test loss {test_loss:.3f}, " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()) + ".")

    if args.prompt is not None:
        mx.random.seed(args.seed)
        prompt_tokens, echo = prompt_of(args, tokenizer)
        generate.generate(model, tokenizer, prompt_tokens, args.num_tokens, sampler_of(args), args.write_every,
                          echo)
    return 0


def sequences_per_example(args):
    return 1 if args.train_mode == "sft" else 2  # a pair is two sequences


def load_test_set(args, model, tokenizer):
    """The test split, refused when empty or when its batches would not fit in memory."""
    test_set = load_data(args, "test", tokenizer)
    if len(test_set) == 0:
        raise UserError(f"{test_set.path}: no test examples")
    trainer.check_memory(model.args, sequences_per_example(args) * args.batch_size, max(test_set.lengths))
    return test_set


def sampler_of(args):
    return generate.Sampler(args.temp, args.top_p, args.top_k, args.min_p, args.repetition_penalty,
                            args.repetition_context_size)


def prompt_of(args, tokenizer):
    """(tokens, text to print before the continuation): --prompt as it is, or with --chat one
    user turn (after --system's) through the model's chat template."""
    if not args.chat:
        return tokenizer.encode(args.prompt, bos=True), args.prompt
    template = chat.load_template(args.model)
    if template is None:
        raise UserError(f"{args.model}: --chat needs a chat template, and this model folder has none "
                        f"({chat.TEMPLATE_FILE})")
    messages = ([{"role": "system", "content": args.system}] if args.system is not None else []) \
        + [{"role": "user", "content": args.prompt}]
    text = chat.render(template, messages, tokenizer, where=os.path.join(args.model, chat.TEMPLATE_FILE))
    return tokenizer.encode(text, bos=False), ""  # the template writes BOS itself where the model has one


if __name__ == "__main__":
    utils.run_script(main)
