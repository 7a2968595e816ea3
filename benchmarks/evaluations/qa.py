"""qa: greedy answers to the dataset's questions, scored against its answers, before and after
fine-tuning: chat data through the model's chat template, or completions data ({"prompt", "completion"},
cwk_create_dataset.py --format completions) as plain text, for a base model without a template."""

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
    """(question, reference answer) of the first `n` lines of a split: a conversation's user and
    assistant turns (the question a list of messages), or a completion's prompt (text) and answer."""
    from utils import read_jsonl

    pairs = []
    for line, obj in read_jsonl(path):
        if "messages" in obj:
            turns = {m["role"]: m["content"] for m in obj["messages"]}
            pairs.append(([{"role": "user", "content": turns["user"]}], turns["assistant"]))
        elif "prompt" in obj and "completion" in obj:
            pairs.append((obj["prompt"], obj["completion"].strip()))
        else:
            raise UserError(f"{path}:{line}: qa needs chat messages or a prompt and completion")
    return pairs[:n]


def prompt(question, tokenizer, template):
    """(tokens, text, whether BOS leads the tokens) of a question: a user turn through the chat
    template (which writes BOS where the model wants one), or a prompt as it is (BOS added where the
    model adds one)."""
    import chat

    if isinstance(question, str):
        return tokenizer.encode(question), question, tokenizer.add_bos
    text = chat.render(template, question, tokenizer)
    return tokenizer.encode(text, bos=False), text, False


def ask(model, tokenizer, template, question, limit):
    """The greedy reply to one question, at most `limit` tokens."""
    import generate

    tokens, _, _ = prompt(question, tokenizer, template)
    return "".join(generate.stream_text(model, tokenizer, tokens, limit))


def score(model_dir, adapter_file, data, samples):
    """{split: ({metric: right answers}, [(question, answer)])} of one model (with adapters)."""
    import chat
    from loading import load_model

    model, tokenizer, _ = load_model(model_dir, adapter_file=adapter_file, generation_only=True)
    template = chat.load_template(model_dir)
    out = {}
    for split in ("train", "test"):
        scores, answers = {"name": 0, "first_line": 0, "exact": 0}, []
        for question, reference in qa_pairs(os.path.join(data, f"{split}.jsonl"), samples):
            if template is None and not isinstance(question, str):
                raise UserError(f"{model_dir}: has no chat template to ask {data}'s chat questions through; "
                                "give completions data (cwk_create_dataset.py --format completions)")
            answer = ask(model, tokenizer, template, question, len(tokenizer.encode(reference, bos=False)) + 8)
            answers.append((question if isinstance(question, str) else question[0]["content"], answer))
            for metric, ok in answer_metrics(answer.strip(), reference).items():
                scores[metric] += ok
        out[split] = (scores, answers)
    return out


def run(args):
    """Greedy answers to the dataset's questions, scored against its answers: the base model (or
    the model with --before-adapter-file), and with --adapter-file the adapted one (before and
    after)."""
    results = {"key": "qa", "model": args.model, "before_adapter_file": args.before_adapter_file,
               "adapter_file": args.adapter_file, "samples": args.samples}
    runs = [("before", args.before_adapter_file)] + ([("after", args.adapter_file)] if args.adapter_file else [])
    for when, adapter_file in runs:
        for split, (scores, answers) in score(args.model, adapter_file, args.data, args.samples).items():
            for metric, n in scores.items():
                results[f"{split}_{metric}_{when}"] = f"{n}/{len(answers)}"
            results[f"{split}_answers_{when}"] = [f"{q} -> {a[:120]!r}" for q, a in answers[:args.show]]
    return results


def add_args(p):
    p.add_argument("--model", default=loading.DEFAULT_MODEL, help="Model folder (default: the default model).")
    p.add_argument("--adapter-file", default=None, help="Adapters to score beside the base model.")
    p.add_argument("--before-adapter-file", default=None,
                   help="Adapters the 'before' scores are of (default: none, the base model): e.g. the supervised "
                        "run's, to score a preference run after it.")
    p.add_argument("--data", default=os.path.join(ROOT, "data"),
                   help="Folder with train.jsonl and test.jsonl, chat or completions.")
    p.add_argument("--samples", type=int, default=30, help="Questions per split (the first N).")
    p.add_argument("--show", type=int, default=4, help="Answers per split to print.")
