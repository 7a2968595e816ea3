"""preference: a DPO (and ORPO) step against supervised steps on the same pairs, on a random model."""

import time

from benchmarks.fixtures import MODEL_SIZES, random_model


def step_seconds(model, objective, batch, steps):
    """Median seconds of one training step of `objective` (after two warm-up steps), LoRA on wq, wv."""
    import mlx.core as mx
    import mlx.optimizers as optim

    import trainer

    optimizer = optim.Adam(learning_rate=1e-5)
    step = trainer.make_train_step(model, optimizer, objective)
    times = []
    for i in range(steps + 2):
        tic = time.perf_counter()
        mx.eval(step(*batch), model.trainable_parameters(), optimizer.state)
        if i >= 2:
            times.append(time.perf_counter() - tic)
    return sorted(times)[len(times) // 2]


def reference_seconds(model, pairs, repeats):
    """Median seconds of the reference's pass over a batch of pairs, as lora.py makes it once per
    pair before training (after one warm-up pass)."""
    import trainer

    P = pairs[0].shape[0]
    times = []
    for i in range(repeats + 1):
        tic = time.perf_counter()
        trainer.reference_logps(model, [list(range(P))], lambda indices: pairs, P, "the batch")
        if i:
            times.append(time.perf_counter() - tic)
    return sorted(times)[len(times) // 2]


def run(args):
    """Steps on --pairs pairs of --seq-len tokens (the answer the second half of each): DPO (its
    batches carrying their reference log-probabilities, computed before training) and ORPO,
    against a supervised step over the same 2P sequences and one over the P chosen ones; their
    costs as ratios (the issue's target: DPO at most 2.2x a supervised step on the same pairs).
    Also the reference's pass over the batch, which each pair costs once."""
    import mlx.core as mx

    import models
    import trainer

    P, T = args.pairs, args.seq_len
    shape = MODEL_SIZES[args.size]
    tokens_P2T = mx.random.randint(0, shape["vocab_size"], (P, 2, T + 1), key=mx.random.key(0))
    mask_P2T = mx.concatenate([mx.zeros((P, 2, T // 2)), mx.ones((P, 2, T - T // 2))], axis=-1)
    pairs = (tokens_P2T[..., :-1], tokens_P2T[..., 1:], mask_P2T)
    both = tuple(a.reshape(2 * P, T) for a in pairs)
    with_reference = (*pairs, mx.random.normal((P, 2), key=mx.random.key(1)) - 100)  # precomputed, as lora.py does
    chosen = tuple(a[:, 0] for a in pairs)
    results = {"key": f"preference-{args.size}", "pairs": P, "seq_len": T, "compute_dtype": args.compute_dtype}
    runs = {"sft_both": (lambda m: trainer.SFT, both), "sft_chosen": (lambda m: trainer.SFT, chosen),
            "dpo": (lambda m: trainer.dpo_objective(0.1), with_reference),
            "orpo": (lambda m: trainer.orpo_objective(0.1), pairs)}
    for name, (objective_of, batch) in runs.items():
        model = random_model(args.size, compute_dtype=args.compute_dtype)
        models.apply_lora(model, models.AdapterConfig(layers=len(model.layers), targets=("wq", "wv")))
        results[f"{name}_step_s"] = round(step_seconds(model, objective_of(model), batch, args.steps), 3)
        if name == "dpo":
            results["reference_pass_s"] = round(reference_seconds(model, pairs, args.steps), 3)
    for name in ("dpo", "orpo"):
        for base in ("sft_both", "sft_chosen"):
            results[f"{name}_over_{base}"] = f"{results[f'{name}_step_s'] / results[f'{base}_step_s']:.2f}x"
    with_pass = results["dpo_step_s"] + results["reference_pass_s"]
    results["dpo_and_reference_pass_over_sft_chosen"] = f"{with_pass / results['sft_chosen_step_s']:.2f}x"
    return results


def add_args(p):
    p.add_argument("--size", default="medium", choices=list(MODEL_SIZES), help="Model shape (medium: about 150M).")
    p.add_argument("--pairs", type=int, default=4, help="Preference pairs per step.")
    p.add_argument("--seq-len", type=int, default=256, help="Tokens of each sequence (prompt and answer).")
    p.add_argument("--steps", type=int, default=5, help="Steps timed, after two warm-up steps.")
    p.add_argument("--compute-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="As lora.py's: bfloat16 products on AMX.")
