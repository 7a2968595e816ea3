"""llamacpp: the main job's GGUF exports run by llama.cpp (llama-cpp-python), their prompt tokens
and greedy tokens against this toolkit's."""

import os
import sys
import tempfile

import loading
from utils import UserError

from benchmarks.evaluations.qa import prompt, qa_pairs
from benchmarks.fusing import run_fuse
from benchmarks.harness import ROOT, run_sampled


def run(args):
    """The default model with the main job's adapters, fused to GGUF (re-quantized, and float32),
    run by llama.cpp itself (llama-cpp-python, optional): does it read the same prompt tokens,
    and choose the same greedy tokens as this toolkit, both over the same GGUF file (read back by
    convert.py) and as the adapted model (base + adapters) the export stands for?"""
    try:
        import llama_cpp
    except ImportError:
        raise UserError("llamacpp needs llama-cpp-python (pip install llama-cpp-python; it compiles llama.cpp)")
    import chat

    template = chat.load_template(args.model)
    questions = [q for q, _ in qa_pairs(os.path.join(args.data, "test.jsonl"), args.samples)]
    adapted = greedy_replies(args.model, args.adapter_file, template, questions, args.tokens)
    results = {"key": "llamacpp", "model": args.model, "adapter_file": args.adapter_file, "prompts": len(questions)}
    with tempfile.TemporaryDirectory() as work:
        for name, extra in (("requantized", []), ("float32", ["--dtype", "float32"])):
            path, folder = os.path.join(work, f"{name}.gguf"), os.path.join(work, name)
            run_fuse(args.model, args.adapter_file, path, "gguf", extra)
            if run_sampled([sys.executable, os.path.join(ROOT, "convert.py"), "--hf-path", path,
                            "--mlx-path", folder])[0] != 0:
                raise UserError(f"convert.py could not read {path} back")
            same_file = greedy_replies(folder, None, template, questions, args.tokens)
            llm = llama_cpp.Llama(path, n_ctx=1024, n_threads=os.cpu_count(), verbose=False)
            counts = {"same_prompt_tokens": 0, "same_greedy_as_this_file_here": 0, "same_greedy_as_adapted": 0}
            for (tokens, text, bos, ours), (*_, reference) in zip(same_file, adapted):
                counts["same_prompt_tokens"] += llm.tokenize(text.encode(), add_bos=bos, special=True) == tokens
                theirs = first_tokens(llm.generate(tokens, top_k=1, temp=0.0, reset=True), {llm.token_eos()}, args.tokens)
                counts["same_greedy_as_this_file_here"] += theirs == ours
                counts["same_greedy_as_adapted"] += theirs == reference
            results.update({f"{name}_{k}": f"{n}/{len(questions)}" for k, n in counts.items()})
            del llm
    return results


def greedy_replies(model_dir, adapter_file, template, questions, limit):
    """[(prompt tokens, prompt text, whether BOS leads, first greedy tokens)] of each question (qa's
    prompt), computed in float32."""
    import generate
    from loading import load_model

    model, tokenizer, _ = load_model(model_dir, adapter_file=adapter_file, compute_dtype="float32")
    out = []
    for question in questions:
        tokens, text, bos = prompt(question, tokenizer, template)
        out.append((tokens, text, bos, first_tokens(generate.generate_tokens(model, tokens), tokenizer.eos_ids, limit)))
    return out


def first_tokens(tokens, eos_ids, limit):
    """The first `limit` tokens of a generator, up to its end of sequence."""
    out = []
    for token in tokens:
        if token in eos_ids or len(out) == limit:
            break
        out.append(token)
    return out


def add_args(p):
    p.add_argument("--model", default=loading.DEFAULT_MODEL, help="Base model folder (default: the default model).")
    p.add_argument("--adapter-file", default=os.path.join(ROOT, "adapters", "adapters.npz"),
                   help="Adapters to fuse (default: the main job's).")
    p.add_argument("--data", default=os.path.join(ROOT, "data"), help="Folder with chat test.jsonl.")
    p.add_argument("--samples", type=int, default=10, help="Test questions to ask.")
    p.add_argument("--tokens", type=int, default=32, help="Greedy tokens to compare per question.")
