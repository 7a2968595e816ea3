"""generate: prompt and decode tokens/s of random models per weight kind, beside the
memory-bandwidth bound."""

import time

from utils import UserError

from benchmarks.fixtures import MODEL_SIZES, random_model
from benchmarks.harness import best_time
from benchmarks.machine import memory_probes


WEIGHT_KINDS = {"float32": ("float32", None), "float16": ("float16", None), "8-bit": ("float32", 8),
                "4-bit": ("float32", 4)}


def weight_bytes_per_token(model):
    """Bytes of weights one decoded token reads: every layer but the embedding table,
    of which it reads one row."""
    from mlx.utils import tree_flatten

    return sum(v.nbytes for k, v in tree_flatten(model.parameters()) if not k.startswith("tok_embeddings"))


def decode_beside_bandwidth(tokens, n_tokens, samples):
    """Decode n_tokens in `samples` parts, each after one timed copy and one read of
    memory_probes, so that the bound and the decoding see the same moments of this
    machine, whose bandwidth drifts by 10-30 % within seconds. Returns the decode
    tokens/s and the mean copy and read bandwidth (GB/s) over those moments."""
    import mlx.core as mx

    probes = memory_probes()
    probe_bytes, probe_s, decode_s = [0, 0], [0.0, 0.0], 0.0
    for part in range(samples):
        for i, probe in enumerate(probes):
            tic = time.perf_counter()
            probe_bytes[i] += probe()
            probe_s[i] += time.perf_counter() - tic
        tic = time.perf_counter()
        for _ in range(n_tokens * (part + 1) // samples - n_tokens * part // samples):
            next(tokens)
        mx.synchronize()  # the step queued behind the last token is this part's, not the copy's
        decode_s += time.perf_counter() - tic
    copy_bw, read_bw = (n / seconds / 1e9 for n, seconds in zip(probe_bytes, probe_s))
    return n_tokens / decode_s, copy_bw, read_bw


def run(args):
    """Prompt and decode tokens/s per weight kind, beside the memory-bandwidth bound."""
    import ops

    if min(args.decode_tokens, args.samples, args.prompt_len) < 1:
        raise UserError("--decode-tokens, --samples and --prompt-len must be at least 1")
    results = {"key": f"generate-{args.size}", "size": args.size, "prompt_tokens": args.prompt_len,
               "cpu_kernels": ops.kernels is not None}
    for kind in args.kinds.split(","):
        results.update({f"{kind}_{key}": value for key, value in generation_speeds(kind, args).items()})
    return results


def generation_speeds(kind, args):
    """Prompt and decode speeds of a random model of one weight kind, and the bandwidth bound."""
    import mlx.core as mx

    import generate

    dtype, bits = WEIGHT_KINDS[kind]
    model = random_model(args.size, bits, dtype, generation_only=True)  # as lora.py --prompt
    prompt = mx.random.randint(0, model.args.vocab_size, (args.prompt_len,)).tolist()
    prompt_s = best_time(lambda: mx.eval(model(mx.array([prompt]), model.make_cache())), repeats=2)
    tokens = generate.generate_tokens(model, prompt)
    next(tokens)  # the first token comes with the prompt
    weight_bytes = weight_bytes_per_token(model)
    decode_tps, copy_bw, read_bw = decode_beside_bandwidth(tokens, args.decode_tokens, args.samples)
    bound_tps, read_bound_tps = copy_bw * 1e9 / weight_bytes, read_bw * 1e9 / weight_bytes
    return {"prompt_tokens_per_s": round(args.prompt_len / prompt_s, 1),
            "decode_tokens_per_s": round(decode_tps, 1), "copy_bandwidth_GBs": round(copy_bw, 1),
            "read_bandwidth_GBs": round(read_bw, 1), "bandwidth_bound_tokens_per_s": round(bound_tps, 1),
            "decode_of_bound": f"{decode_tps / bound_tps:.0%}", "decode_of_read_bound": f"{decode_tps / read_bound_tps:.0%}"}


def add_args(p):
    p.add_argument("--size", default="medium", choices=list(MODEL_SIZES), help="Model shape (medium: about 150M).")
    p.add_argument("--kinds", default=",".join(WEIGHT_KINDS), help="Weight kinds, comma-separated.")
    p.add_argument("--prompt-len", type=int, default=128, help="Prompt tokens.")
    p.add_argument("--decode-tokens", type=int, default=64, help="Decoded tokens timed.")
    p.add_argument("--samples", type=int, default=16,
                   help="Parts the decoding is timed in, each after a timed copy and read of 512 MiB.")
