"""qa: greedy chat answers to the dataset's questions, scored against its answers, before and
after fine-tuning."""

import os

import loading
from utils import UserError

from benchmarks.harness import ROOT


def answer_metrics(generated, reference):
    """Does the answer name the right object, match its first line, match it whole?"""
    name = reference.split("(")[0].split(" ")[0]
    return {"name": generated.startswith(name),
            "first_line": generated.split("\n")[0] == reference.split("\n")[0],
            "exact": generated.strip() == reference.strip()}


def qa_pairs(path, n):
    """(question, reference answer) of the first `n` conversations of a chat split."""
    from utils import read_jsonl

    pairs = []
    for _, obj in read_jsonl(path):
        turns = {m["role"]: m["content"] for m in obj["messages"]}
        pairs.append((turns["user"], turns["assistant"]))
    return pairs[:n]


def ask(model, tokenizer, template, question, limit):
    """The greedy reply to one user turn through the chat template, at most `limit` tokens."""
    import chat
    import generate

    prompt = tokenizer.encode(chat.render(template, [{"role": "user", "content": question}], tokenizer), bos=False)
    return "".join(generate.stream_text(model, tokenizer, prompt, limit))


def score(model_dir, adapter_file, data, samples):
    """{split: ({metric: right answers}, [(question, answer)])} of one model (with adapters)."""
    import chat
    from loading import load_model

    model, tokenizer, _ = load_model(model_dir, adapter_file=adapter_file, generation_only=True)
    template = chat.load_template(model_dir)
    if template is None:
        raise UserError(f"{model_dir}: qa asks through the chat template, and this model has none")
    out = {}
    for split in ("train", "test"):
        scores, answers = {"name": 0, "first_line": 0, "exact": 0}, []
        for question, reference in qa_pairs(os.path.join(data, f"{split}.jsonl"), samples):
            answer = ask(model, tokenizer, template, question, len(tokenizer.encode(reference, bos=False)) + 8)
            answers.append((question, answer))
            for metric, ok in answer_metrics(answer.strip(), reference).items():
                scores[metric] += ok
        out[split] = (scores, answers)
    return out


def run(args):
    """Greedy answers to the dataset's questions through the chat template, scored against its
    answers: the base model, and with --adapter-file the adapted one (before and after)."""
    results = {"key": "qa", "model": args.model, "adapter_file": args.adapter_file, "samples": args.samples}
    runs = [("before", None)] + ([("after", args.adapter_file)] if args.adapter_file else [])
    for when, adapter_file in runs:
        for split, (scores, answers) in score(args.model, adapter_file, args.data, args.samples).items():
            for metric, n in scores.items():
                results[f"{split}_{metric}_{when}"] = f"{n}/{len(answers)}"
            results[f"{split}_answers_{when}"] = [f"{q} -> {a[:120]!r}" for q, a in answers[:args.show]]
    return results


def add_args(p):
    p.add_argument("--model", default=loading.DEFAULT_MODEL, help="Model folder (default: the default model).")
    p.add_argument("--adapter-file", default=None, help="Adapters to score beside the base model.")
    p.add_argument("--data", default=os.path.join(ROOT, "data"), help="Folder with chat train.jsonl and test.jsonl.")
    p.add_argument("--samples", type=int, default=30, help="Questions per split (the first N).")
    p.add_argument("--show", type=int, default=4, help="Answers per split to print.")
