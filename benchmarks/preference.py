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


def run(args):
    """Steps on --pairs pairs of --seq-len tokens (the answer the second half of each): DPO (its
    reference the model as training starts) and ORPO, against a supervised step over the same 2P
    sequences and one over the P chosen ones; their costs as ratios (the issue's target: DPO at
    most 2.2x a supervised step on the same pairs)."""
    import mlx.core as mx

    import models
    import trainer

    P, T = args.pairs, args.seq_len
    shape = MODEL_SIZES[args.size]
    tokens_P2T = mx.random.randint(0, shape["vocab_size"], (P, 2, T + 1), key=mx.random.key(0))
    mask_P2T = mx.concatenate([mx.zeros((P, 2, T // 2)), mx.ones((P, 2, T - T // 2))], axis=-1)
    pairs = (tokens_P2T[..., :-1], tokens_P2T[..., 1:], mask_P2T)
    both = tuple(a.reshape(2 * P, T) for a in pairs)
    chosen = tuple(a[:, 0] for a in pairs)
    results = {"key": f"preference-{args.size}", "pairs": P, "seq_len": T, "compute_dtype": args.compute_dtype}
    runs = {"sft_both": (lambda m: trainer.SFT, both), "sft_chosen": (lambda m: trainer.SFT, chosen),
            "dpo": (lambda m: trainer.dpo_objective(trainer.start_reference(m), 0.1), pairs),
            "orpo": (lambda m: trainer.orpo_objective(0.1), pairs)}
    for name, (objective_of, batch) in runs.items():
        model = random_model(args.size, compute_dtype=args.compute_dtype)
        models.apply_lora(model, models.AdapterConfig(layers=len(model.layers), targets=("wq", "wv")))
        results[f"{name}_step_s"] = round(step_seconds(model, objective_of(model), batch, args.steps), 3)
    for name in ("dpo", "orpo"):
        for base in ("sft_both", "sft_chosen"):
            results[f"{name}_over_{base}"] = f"{results[f'{name}_step_s'] / results[f'{base}_step_s']:.2f}x"
    return results


def add_args(p):
    p.add_argument("--size", default="medium", choices=list(MODEL_SIZES), help="Model shape (medium: about 150M).")
    p.add_argument("--pairs", type=int, default=4, help="Preference pairs per step.")
    p.add_argument("--seq-len", type=int, default=256, help="Tokens of each sequence (prompt and answer).")
    p.add_argument("--steps", type=int, default=5, help="Steps timed, after two warm-up steps.")
    p.add_argument("--compute-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="As lora.py's: bfloat16 products on AMX.")
