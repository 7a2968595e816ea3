"""Build a fine-tuning dataset from the docstrings of installed Python packages.

Every public module, class, function and method becomes one question and answer,
named by its shortest public path, with the call signature of functions and methods:

    Q: What is ReLU in mlx?
    A: mlx.nn.ReLU Applies the Rectified Linear Unit. ...

    Q: What is matmul in mlx?
    A: mlx.core.matmul(a: array, b: array, /, *, stream: StreamOrDevice = None) -> array Matrix multiplication. ...

The question uses the shortest tail of that path no other object shares
(`array.reshape` beside `core.reshape`). The answers go to train/valid/test
JSONL files that `lora.py` reads:

    python cwk_create_dataset.py --packages mlx --out data
    python cwk_create_dataset.py --packages json email --format completions --out /tmp/stdlib

Modules are imported in worker processes, so one that raises, hangs or prints
cannot stop or pollute the run; it is listed at the end instead.
"""

import collections
import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import json
import multiprocessing
import multiprocessing.connection
import os
import pkgutil
import re
import sys
import textwrap
import time
import warnings
from dataclasses import dataclass
from typing import List, Optional

from tqdm import tqdm

import settings
import utils
from settings import option
from utils import UserError, atomic_write, run_script

SPLITS = ("train", "valid", "test")

# Test suites are code, not documentation: their modules are counted, not imported.
TEST_MODULE_NAMES = {"tests", "test", "conftest"}

# A docstring with fewer words than this ("TODO", "Deprecated.") teaches nothing.
MIN_WORDS = 2


@dataclass
class DatasetSettings(settings.Settings):
    packages: List[str] = option(("mlx",), "top-level packages whose docstrings to use, space-separated",
                                 metavar="PACKAGE")
    out: str = option("data", "folder for train.jsonl, valid.jsonl and test.jsonl")
    format: str = option("chat", '"chat" writes {"messages": [{"role": "user", "content": "What is ... in mlx?"}, '
                         '{"role": "assistant", "content": ...}]}, rendered by the model\'s chat template; '
                         '"text" writes {"text": "Q: ...\\nA: ..."}; "completions" writes '
                         '{"prompt": "Q: ...\\nA:", "completion": " ..."} for training on answers only; '
                         '"plain" writes {"text": "<path><signature> <docstring>"}, a pretraining corpus (pretrain.py); '
                         '"preference" writes pairs for lora.py --train-mode dpo|orpo: {"prompt": [user turn], '
                         '"chosen": [the right answer], "rejected": [another object of the same module\'s answer, '
                         'never a test object\'s]}',
                         choices=["chat", "text", "completions", "plain", "preference"])
    seq_limit: int = option(2048, "longest docstring kept, in characters; a longer one is cut at its last "
                                  "paragraph break within the limit, else at its last sentence end; one with "
                                  "neither is dropped", at_least=1)
    test_size: float = option(0.1, "fraction of documented objects in test.jsonl", at_least=0, below=1)
    valid_size: float = option(0.1, "fraction of documented objects in valid.jsonl", at_least=0, below=1)
    batch_size: int = option(64, "docstrings cleaned per task handed to a worker", at_least=1)
    workers: Optional[int] = option(None, "worker processes that import modules and clean docstrings "
                                          "(default: one per CPU core)", at_least=1, at_most=64)
    import_timeout: float = option(30.0, "seconds one module may take to import and read before its worker "
                                         "is killed and the module skipped", above=0, at_most=86400)
    no_preprocess: bool = option(False, "keep docstrings as written: no markup cleaning, no dropping of trivial "
                                        "ones, and one example per import path instead of one per object")
    seed: int = option(0, "seed of the train/valid/test assignment", at_least=0)
    force: bool = option(False, "overwrite an existing dataset in --out")

    def check(self):
        for package in self.packages:
            if not package.isidentifier():
                raise UserError(f"--packages takes top-level package names such as mlx or numpy, got {package!r}")
        if self.test_size + self.valid_size >= 1:
            raise UserError(f"--test-size plus --valid-size must be below 1, got {self.test_size + self.valid_size:g}")
        self.packages = list(dict.fromkeys(self.packages))


# ---------------------------------------------------------------------------
# Finding modules, without importing them


def list_modules(packages):
    """Return [(package, module name)] for every public module, and how many test modules were left out.

    Only the file system is read: importing here would let a broken module stop the run.
    """
    modules, test_modules = [], 0
    for package in packages:
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            raise UserError(f"unknown package: {package} (is it installed in this Python?)")
        names = [package]
        for name in _submodule_names(package, spec.submodule_search_locations or []):
            if TEST_MODULE_NAMES.intersection(name.split(".")):
                test_modules += 1
            else:
                names.append(name)
        modules += [(package, name) for name in names]
    return modules, test_modules


def _submodule_names(prefix, search_path):
    # A namespace package may list one subpackage in several folders: walk each name once.
    children = {}
    for info in pkgutil.iter_modules(search_path):
        if _is_public(info.name) and info.name.isidentifier():
            children.setdefault(info.name, info)
    for name, info in sorted(children.items()):
        full_name = f"{prefix}.{name}"
        yield full_name
        folder = getattr(info.module_finder, "path", None)
        if info.ispkg and folder:
            yield from _submodule_names(full_name, [os.path.join(folder, name)])


def _is_public(name):
    return not name.startswith("_")


# ---------------------------------------------------------------------------
# Cleaning docstrings


def prepare_text(prose, preprocess, seq_limit):
    """Return (text, status) for a docstring's prose; status says whether and why it is kept."""
    text = clean_docstring(prose) if preprocess else prose.strip()
    if not text:
        return "", "empty"
    if preprocess and len(text.split()) < MIN_WORDS:
        return "", "trivial"
    if len(text) <= seq_limit:
        return text, "kept"
    text = fit_to_limit(text, seq_limit)
    return text, ("truncated" if text else "too long")


# A line that starts with a call; numpy's scalar methods write the class too: "single.is_integer() -> bool".
CALL_LINE = re.compile(r"(?:[\w.]+\.)?(\w+)\(")


def split_call_lines(doc, names):
    """Split the call lines that compiled functions put first ("matmul(a, b) -> array") from the prose."""
    lines = doc.split("\n")

    def is_call(line):  # one shared pattern: a pattern per object's names would never be cached
        match = CALL_LINE.match(line)
        return match is not None and match.group(1) in names

    count = 0
    while count < len(lines) and is_call(lines[count]):
        count += 1
    # Call lines stand alone; "matmul(a, b) computes ..." is prose that happens to start with a call.
    if count and (count == len(lines) or not lines[count].strip()):
        return lines[:count], "\n".join(lines[count:])
    return [], doc


def clean_docstring(doc):
    """Turn reStructuredText and Sphinx markup into plain readable text (Markdown for code)."""
    lines = _separate_summary(inspect.cleandoc(doc).split("\n"))
    lines = _render_headings(_render_literal_markers(_render_directives(lines)))
    text = _render_inline("\n".join(line.rstrip() for line in lines))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _separate_summary(lines):
    # "Summary.\n        More." (text right after the quotes, the rest indented deeper) reads as two paragraphs.
    end = next((i for i, line in enumerate(lines) if not line.strip()), len(lines))
    if end < 2 or not lines[0].endswith(".") or not lines[1].startswith(" "):
        return lines
    return [lines[0], ""] + textwrap.dedent("\n".join(lines[1:end])).split("\n") + lines[end:]


_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$")
_COMMENT = re.compile(r"^(\s*)\.\.(\s|$)")
_FOOTNOTE = re.compile(r"^(\s*)\.\.\s+\[([^\]]+)\]\s+(.*)$")
_OPTION = re.compile(r"^\s*:[\w -]+:")

_ADMONITION_NAMES = "attention caution danger error hint important note tip warning"
_ADMONITIONS = {name: name.capitalize() for name in _ADMONITION_NAMES.split()}
_ADMONITIONS.update(seealso="See also", todo="To do")
_VERSION_NOTES = {
    "versionadded": "New in version",
    "versionchanged": "Changed in version",
    "deprecated": "Deprecated since version",
}
_CODE_DIRECTIVES = {"code-block", "code", "sourcecode", "testcode", "doctest"}
# Page machinery with nothing to read: dropped with their content.
_DROPPED_DIRECTIVES = set(
    "autosummary currentmodule figure highlight image include index module plot raw toctree".split()
)


def _render_directives(lines):
    out = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not _COMMENT.match(line):
            out.append(line)
            i += 1
            continue
        indent = re.match(r"\s*", line).group()
        end = _block_end(lines, i + 1, len(indent))
        directive, footnote = _DIRECTIVE.match(line), _FOOTNOTE.match(line)
        if directive:
            out += _render_directive(directive.group(2), directive.group(3), lines[i + 1 : end], indent)
        elif footnote:
            out.append(f"{indent}[{footnote.group(2)}] {footnote.group(3)}")
            out += lines[i + 1 : end]
        # Anything else starting with ".." is a comment or a link target: not text.
        i = end
    return out


def _block_end(lines, start, indent):
    """Index just past the block that is indented deeper than `indent` (blank lines inside included)."""
    end = start
    for j in range(start, len(lines)):
        if lines[j].strip():
            if len(lines[j]) - len(lines[j].lstrip()) <= indent:
                break
            end = j + 1
    return end


def _render_directive(name, argument, block, indent):
    while block and _OPTION.match(block[0]):
        block = block[1:]
    body = _render_directives(textwrap.dedent("\n".join(block)).strip("\n").split("\n")) if block else []
    name = name.lower().removeprefix("py:")
    if name in _DROPPED_DIRECTIVES:
        return []
    if name in _CODE_DIRECTIVES:
        return [f"{indent}```{argument}"] + [indent + line if line else line for line in body] + [f"{indent}```"]
    if name in _ADMONITIONS:
        first = [argument] if argument else []
        return _indented(f"{_ADMONITIONS[name]}: ", first + body, indent)
    if name in _VERSION_NOTES:
        note = f"{_VERSION_NOTES[name]} {argument}".rstrip()
        return _indented(f"{note}: ", body, indent) if body else [f"{indent}{note}."]
    # math, only, rubric and friends: their argument and content are the text.
    return _indented("", ([argument] if argument else []) + body, indent)


def _indented(label, body, indent):
    if not body:
        return [f"{indent}{label}".rstrip()]
    return [f"{indent}{label}{body[0]}"] + [indent + line if line else line for line in body[1:]]


def _render_literal_markers(lines):
    # "Example::" introduces a literal block and reads as "Example:"; a lone "::" reads as nothing.
    out = []
    for line in lines:
        stripped = line.rstrip()
        if stripped.strip() == "::":
            continue
        if stripped.endswith("::"):
            stripped = stripped[:-3] if stripped.endswith(" ::") else stripped[:-1]
        out.append(stripped)
    return out


_UNDERLINE = re.compile(r"^([-=~^\"'`#*+])\1{2,}\s*$")


def _render_headings(lines):
    # "Parameters\n----------" becomes "Parameters:", the way Google-style docstrings write it.
    out = []
    for line in lines:
        title = out[-1] if out else ""
        if _UNDERLINE.match(line) and title.strip() and not title[0].isspace() and len(line.strip()) >= len(title):
            out[-1] = title if title.endswith(":") else f"{title}:"
        else:
            out.append(line)
    return out


_ROLE = re.compile(r":(?:[\w.-]+:)?([\w.-]+):`([^`]+)`")
_CODE_ROLES = {"attr", "class", "const", "data", "exc", "func", "meth", "mod", "obj", "type"}
_LINK = re.compile(r"`([^`<>]*?)\s*<([^`<>]+)>`__?")
_NAMED_REF = re.compile(r"`([^`]+)`__?(?!\w)")
_FOOTNOTE_REF = re.compile(r" ?\[(\d+|#[\w-]*|\*)\]_")
_LITERAL = re.compile(r"(?<!`)``(?!`)(.+?)(?<!`)``(?!`)", re.DOTALL)  # not a Markdown ``` fence


def _render_inline(text):
    text = _ROLE.sub(_render_role, text)
    text = _LINK.sub(lambda m: f"{m.group(1)} ({m.group(2)})" if m.group(1) else m.group(2), text)
    text = _NAMED_REF.sub(r"\1", text)
    text = _FOOTNOTE_REF.sub(r" [\1]", text)
    return _LITERAL.sub(r"`\1`", text)


def _render_role(match):
    role, body = match.groups()
    titled = re.match(r"^(.+?)\s*<([^<>]+)>$", body)
    if titled:
        body = titled.group(1)
    elif body.startswith("~"):
        body = body[1:].rsplit(".", 1)[-1]  # "~a.b.Foo" asks Sphinx to show only "Foo"
    body = body.lstrip("!.")
    return f"`{body}`" if role in _CODE_ROLES else body


def fit_to_limit(text, limit):
    """Cut `text` to at most `limit` characters at its last paragraph break, else sentence end; "" if none fits."""
    window = text[: limit + 1]
    paragraph_ends = [m.start() for m in re.finditer(r"\n\s*\n", window)]
    sentence_ends = [m.end() for m in re.finditer(r"[.!?](?=\s)", window)]
    for cut in sorted(paragraph_ends, reverse=True) + sorted(sentence_ends, reverse=True):
        kept = text[:cut].rstrip()
        # Never leave a Markdown code fence open.
        if kept and kept.count("```") % 2 == 0:
            return kept
    return ""


# ---------------------------------------------------------------------------
# Reading one module (runs in a worker process)


def walk_module(module_name, package, known_modules, cache):
    """Import a module; return a record (key, path, is_alias, signature, prose) per object found.

    `key` names the object itself, so the same object reached through several
    import paths gives several records with one key.
    """
    module = importlib.import_module(module_name)
    records = []
    _walk_namespace(module, package, known_modules, cache, records)
    return records


def _walk_namespace(module, package, known_modules, cache, records):
    path = module.__name__
    records.append(_record(f"module:{path}", path, module, path, False, cache))
    namespace = vars(module)
    for name in _public_names(namespace):
        obj, obj_path = namespace[name], f"{path}.{name}"
        try:
            if inspect.ismodule(obj):
                # Compiled packages create submodules (mlx.core.random) that no file lists.
                if obj.__name__ == obj_path and obj_path not in known_modules:
                    _walk_namespace(obj, package, known_modules, cache, records)
            elif _defined_in(obj, package) and (inspect.isclass(obj) or _is_routine(obj)):
                key = _object_key(obj, obj_path)
                records.append(_record(key, obj_path, obj, name, _is_routine(obj), cache))
                if inspect.isclass(obj):
                    records += _walk_class(obj, key, obj_path, cache)
        except Exception:
            continue  # an object that raises when inspected documents nothing


def _public_names(namespace):
    names = namespace.get("__all__")
    if not isinstance(names, (list, tuple)) or not all(isinstance(name, str) for name in names):
        names = list(namespace)
    return [name for name in names if _is_public(name) and name in namespace]


def _walk_class(cls, class_key, class_path, cache):
    # Only the class's own members: an inherited method is documented where it is defined.
    records = []
    for name, member in vars(cls).items():
        if not _is_public(name):
            continue
        if isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
        is_routine = _is_routine(member)
        if is_routine or _is_attribute(member):
            key, path = f"{class_key}.{name}", f"{class_path}.{name}"
            records.append(_record(key, path, member, name, is_routine, cache))
    return records


def _is_routine(obj):
    # numpy's ufuncs are callable objects rather than functions, yet documented like functions.
    named_callable = callable(obj) and not inspect.isclass(obj) and isinstance(getattr(obj, "__name__", None), str)
    return inspect.isroutine(obj) or named_callable


def _is_attribute(member):
    return isinstance(member, property) or inspect.isgetsetdescriptor(member) or inspect.ismemberdescriptor(member)


def _defined_in(obj, package):
    module = getattr(obj, "__module__", None)
    return isinstance(module, str) and (module == package or module.startswith(package + "."))


def _object_key(obj, path):
    qualname = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    if not isinstance(qualname, str) or "<" in qualname:
        return f"path:{path}"  # lambdas and locals share qualnames; only their path tells them apart
    return f"{obj.__module__}:{qualname}"


def _record(key, path, obj, name, is_routine, cache):
    # Cached by identity, not key: a wrapper may share its wrapped function's key, not its docstring.
    if id(obj) not in cache:
        cache[id(obj)] = (obj, _signature_and_prose(obj, name, is_routine))  # holding obj keeps its id unique
    is_alias = name != getattr(obj, "__name__", name)  # mx.asin is mx.arcsin under another name
    return (key, path, is_alias) + cache[id(obj)][1]


def _signature_and_prose(obj, name, is_routine):
    doc = getattr(obj, "__doc__", None)
    if not isinstance(doc, str):
        return "", ""
    doc = _without_addresses(inspect.cleandoc(doc))
    call_lines, prose = split_call_lines(doc, {name, getattr(obj, "__name__", name)})
    if not is_routine:
        return "", prose
    if call_lines:
        return call_lines[0][call_lines[0].index("(") :], prose
    return _python_signature(obj), prose


def _python_signature(obj):
    try:
        signature = str(inspect.signature(obj))
    except Exception:
        return ""  # a signature is a bonus: never lose the docstring over it
    return _without_addresses(signature)


def _without_addresses(text):
    # Reprs such as "<object object at 0x7f3a...>" carry a memory address that changes every run.
    return re.sub(r" at 0x[0-9a-fA-F]+", "", text)


# ---------------------------------------------------------------------------
# Worker processes


def worker_main(conn, settings):
    """Run the tasks the main process sends, one at a time, saying when each begins and how it ended."""
    # Imported modules may print; our results travel through `conn` only.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    warnings.simplefilter("ignore")
    cache = {}
    while True:
        task = conn.recv()
        if task is None:
            # Imported modules may leave threads or exit hooks behind; do not wait for them.
            os._exit(0)
        conn.send("begin")
        try:
            outcome = (_run_task(task, settings, cache), None)
        except (Exception, SystemExit) as e:
            outcome = (None, _one_line(e))
        conn.send(outcome)


def _run_task(task, settings, cache):
    kind, *arguments = task
    if kind == "walk":
        package, module = arguments
        return walk_module(module, package, settings["modules"], cache)
    (proses,) = arguments
    return [prepare_text(prose, settings["preprocess"], settings["seq_limit"]) for prose in proses]


def _one_line(error):
    message = str(error).strip().split("\n")[0][:200]
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


class Pool:
    """Worker processes, each running one task at a time.

    A task that hangs past its timeout or kills its process fails alone: the
    worker is killed and replaced, and the other tasks go on.
    """

    def __init__(self, size, settings):
        self.settings = settings
        # Workers fork from a fresh server process: cheap to start, and none of our threads come along.
        methods = multiprocessing.get_all_start_methods()
        self.context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        self.workers = [None] * size  # a slot is empty until there is work for it

    def run(self, tasks, timeout=None, desc="tasks"):
        """Run every task; return a (result, error or None) per task, in task order."""
        outcomes = [None] * len(tasks)
        # Neighbouring tasks (modules of one subpackage) import the same things, so each worker
        # takes a contiguous share of the list; an idle worker takes over the end of the largest share left.
        lanes = _contiguous_shares(list(enumerate(tasks)), len(self.workers))
        with tqdm(total=len(tasks), desc=desc, disable=None, file=sys.stderr) as bar:
            while any(lanes) or self._busy():
                self._hand_out(lanes)
                busy = self._busy()
                ready = [w.conn for w in busy] + [w.process.sentinel for w in busy]
                multiprocessing.connection.wait(ready, timeout=_time_left(busy, timeout))
                for worker in busy:
                    finished = worker.collect(timeout)
                    if finished:
                        index, outcomes[index] = finished
                        bar.update()
        return outcomes

    def _busy(self):
        return [worker for worker in self.workers if worker is not None and worker.task is not None]

    def _hand_out(self, lanes):
        for slot, lane in enumerate(lanes):
            worker = self.workers[slot]
            donor = lane or max(lanes, key=len)
            if not donor or (worker is not None and worker.task is not None):
                continue
            if worker is None or not worker.alive:
                worker = self.workers[slot] = Worker(self.context, self.settings)
            worker.give(*(lane.popleft() if lane else donor.pop()))

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        for worker in self.workers:
            if worker is not None:
                worker.stop()


class Worker:
    """One worker process and the task it is running, if any."""

    def __init__(self, context, settings):
        self.conn, worker_end = context.Pipe()
        self.process = context.Process(target=worker_main, args=(worker_end, settings), daemon=True)
        with _fixed_hash_seed():
            self.process.start()
        worker_end.close()
        self.task = None  # index of the task it runs
        self.began = None  # when it began that task
        self.has_begun = False  # whether it ever began a task
        self.alive = True

    def give(self, index, task):
        self.task, self.began = index, None
        self.conn.send(task)

    def collect(self, timeout):
        """Return (task index, outcome) if its task ended, else None."""
        try:
            while self.conn.poll():
                message = self.conn.recv()
                if message != "begin":
                    index, self.task = self.task, None
                    return index, message
                self.began, self.has_begun = time.monotonic(), True
        except (EOFError, OSError):
            return self._end(self._death_reason())  # the pipe closes when the process ends
        if not self.process.is_alive():
            return self._end(self._death_reason())
        if timeout is not None and self.began is not None and time.monotonic() - self.began > timeout:
            return self._end(f"import timed out after {timeout:g} s")
        return None

    def _death_reason(self):
        self.process.join(timeout=1)
        if not self.has_begun:
            # No task's fault: if no worker can start, no task can run.
            raise RuntimeError(f"worker process failed to start (exit code {self.process.exitcode})")
        return f"worker process died (exit code {self.process.exitcode})"

    def _end(self, reason):
        self.stop()
        index, self.task = self.task, None
        return index, (None, reason)

    def stop(self):
        if self.alive and self.task is None:
            with contextlib.suppress(OSError):
                self.conn.send(None)
            self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()
        self.alive = False


def _contiguous_shares(items, count):
    bounds = [i * len(items) // count for i in range(count + 1)]
    return [collections.deque(items[start:end]) for start, end in zip(bounds, bounds[1:])]


def _time_left(busy, timeout):
    started = [worker.began for worker in busy if worker.began is not None]
    if timeout is None or not started:
        return None
    return max(0.0, min(started) + timeout - time.monotonic())


@contextlib.contextmanager
def _fixed_hash_seed():
    # Workers with a fixed hash seed iterate sets the same way every run, so docstrings
    # built from sets at import time come out the same.
    previous = os.environ.get("PYTHONHASHSEED")
    os.environ["PYTHONHASHSEED"] = "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["PYTHONHASHSEED"]
        else:
            os.environ["PYTHONHASHSEED"] = previous


# ---------------------------------------------------------------------------
# From modules to examples


Found = collections.namedtuple("Found", "path is_alias package signature prose")


def read_modules(pool, modules, timeout):
    """Walk every module in the pool; return ({key: [Found], canonical first}, {module: why it was skipped})."""
    tasks = [("walk", package, module) for package, module in modules]
    outcomes = pool.run(tasks, timeout, desc="reading modules")
    objects, skipped = collections.defaultdict(list), {}
    for (package, module), (records, error) in zip(modules, outcomes):
        if error:
            skipped[module] = error
        for key, path, is_alias, signature, prose in records or []:
            objects[key].append(Found(path, is_alias, package, signature, prose))
    for found in objects.values():
        # Canonical: the object's own name over an alias, then the shortest path, then the first alphabetically.
        found.sort(key=lambda f: (f.is_alias, f.path.count("."), f.path))
    return dict(objects), skipped


def clean_all(pool, objects, batch_size):
    """Clean each object's docstring once, in batches across the pool; return {key: (text, status)}."""
    keys = sorted(objects)
    batches = [keys[i : i + batch_size] for i in range(0, len(keys), batch_size)]
    tasks = [("clean", [objects[key][0].prose for key in batch]) for batch in batches]
    cleaned = {}
    for batch, (results, error) in zip(batches, pool.run(tasks, desc="cleaning docstrings")):
        if error:
            raise RuntimeError(f"cleaning docstrings failed: {error}")
        cleaned.update(zip(batch, results))
    return cleaned


def make_examples(objects, cleaned, preprocess):
    """Return the examples as dicts; every example of one object shares its canonical path as `group`."""
    examples = []
    for key, found in objects.items():
        text, status = cleaned[key]
        if status not in ("kept", "truncated"):
            continue
        package, group, signature = found[0].package, found[0].path, found[0].signature
        for path in [group] if preprocess else [f.path for f in found]:
            examples.append(dict(package=package, group=group, path=path, signature=signature, text=text))
    short = short_names({(example["package"], example["group"]) for example in examples})
    for example in examples:
        example["short"] = short[example["package"], example["group"]]
    return examples


def short_names(objects):
    """Name each (package, path) by the shortest tail of its path that no other object of its package shares."""
    tails = collections.Counter((package, tail) for package, path in objects for tail in _tails(path))
    # A path that is itself another object's tail (or shared) has no unique tail: use it whole.
    return {(package, path): next((t for t in _tails(path) if tails[package, t] == 1), path)
            for package, path in objects}


def _tails(path):
    parts = path.split(".")
    return [".".join(parts[-n:]) for n in range(1, len(parts) + 1)]


def question_and_answer(example):
    question = f"Q: What is {example['short']} in {example['package']}?"
    answer = f"A: {example['path']}{example['signature']} {example['text']}"
    return question, answer


def format_example(example, fmt):
    question, answer = question_and_answer(example)
    if fmt == "text":
        return {"text": f"{question}\n{answer}"}
    if fmt == "plain":
        return {"text": answer[len("A: ") :]}
    if fmt == "preference":  # TRL's conversational preference pair
        return {"prompt": [{"role": "user", "content": question[len("Q: "):]}],
                "chosen": [{"role": "assistant", "content": answer[len("A: "):]}],
                "rejected": [{"role": "assistant", "content": question_and_answer(example["rejected"])[1][len("A: "):]}]}
    if fmt == "chat":  # rendered by the model's own chat template when training
        return {"messages": [{"role": "user", "content": question[len("Q: ") :]},
                             {"role": "assistant", "content": answer[len("A: ") :]}]}
    # "A:" stays in the prompt so that prompt + completion is exactly the "text" form.
    return {"prompt": f"{question}\nA:", "completion": answer[len("A:") :]}


def split_examples(examples, test_size, valid_size, seed):
    """Assign each object, with all its examples, to a split by a seeded hash of its canonical path."""
    groups = sorted({example["group"] for example in examples}, key=lambda group: _stable_hash(seed, group))
    n_test, n_valid = _split_size(len(groups), test_size), _split_size(len(groups), valid_size)
    if n_test + n_valid >= len(groups):
        sizes = f"--test-size {test_size} and --valid-size {valid_size}"
        raise UserError(f"only {len(groups)} documented objects: too few for {sizes}")
    rank = {group: i for i, group in enumerate(groups)}
    splits = {name: [] for name in SPLITS}
    for example in sorted(examples, key=lambda example: (rank[example["group"]], example["path"])):
        i = rank[example["group"]]
        name = "test" if i < n_test else "valid" if i < n_test + n_valid else "train"
        splits[name].append(example)
    return splits


def with_rejected(splits, seed):
    """Each example paired with a wrong answer to reject: the answer of another object of its
    module (the package's module it is in: mlx.nn for mlx.nn.losses.mse_loss), drawn by a seeded
    hash from the train and valid splits alone, so that no test object's answer is ever trained
    on. An example whose module has no such other object is left out.

    Not the path's parent alone: siblings share their submodule, so such a pair never says
    which submodule is right."""
    by_module = collections.defaultdict(list)
    for name in ("train", "valid"):
        for example in splits[name]:
            by_module[_module_of(example)].append(example)
    paired = {}
    for name, examples in splits.items():
        paired[name] = []
        for example in examples:
            others = [o for o in by_module[_module_of(example)] if o["group"] != example["group"]]
            if others:
                rejected = min(others, key=lambda o: _stable_hash(seed, example["path"] + "\0" + o["path"]))
                paired[name].append(dict(example, rejected=rejected))
    return paired


def _module_of(example):
    """The package's module an example's object is in: the package's name and one more part."""
    depth = example["package"].count(".") + 2
    return ".".join(example["group"].split(".")[:depth])


def _stable_hash(seed, text):
    # Python's hash() is salted per process; sha256 is the same everywhere.
    return hashlib.sha256(f"{seed}\0{text}".encode()).hexdigest()


def _split_size(total, fraction):
    return max(1, round(total * fraction)) if fraction > 0 else 0


# ---------------------------------------------------------------------------
# Output


def dataset_paths(out, force):
    """Return {split: path}, refusing to replace an existing dataset unless `force`."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"{out} exists and is not a folder")
    paths = {name: os.path.join(out, f"{name}.jsonl") for name in SPLITS}
    existing = [path for path in paths.values() if os.path.exists(path) and os.path.getsize(path) > 0]
    if existing and not force:
        raise UserError(f"{existing[0]} already exists; pass --force to overwrite the dataset in {out}")
    return paths


def write_splits(paths, splits, fmt):
    """Write the three files together: each appears only once all three are fully written."""
    os.makedirs(os.path.dirname(os.path.abspath(paths["train"])), exist_ok=True)
    with contextlib.ExitStack() as stack:
        files = {name: stack.enter_context(atomic_write(path, "wb")) for name, path in paths.items()}
        for name, examples in splits.items():
            for example in examples:
                line = json.dumps(format_example(example, fmt), ensure_ascii=False) + "\n"
                files[name].write(line.encode("utf-8"))


def report(args, modules, test_modules, skipped, cleaned, objects, examples, splits, seconds):
    print(f"Read {len(modules)} modules with {args.workers} workers in {seconds:.1f} s.")
    for package in args.packages:
        read = sum(1 for p, module in modules if p == package and module not in skipped)
        failed = sum(1 for p, module in modules if p == package and module in skipped)
        count = sum(1 for example in examples if example["package"] == package)
        print(f"  {package}: {read} modules read, {failed} skipped, {count} examples")
    print("Splits: " + ", ".join(f"{name} {len(splits[name])}" for name in SPLITS) + f" (in {args.out})")
    status = collections.Counter(status for _, status in cleaned.values())
    duplicates = sum(len(found) - 1 for found in objects.values())
    merged = "kept (--no-preprocess)" if args.no_preprocess else "merged"
    print(f"Objects: {len(objects)} found, {duplicates} duplicate import paths {merged}")
    print(f"  dropped: {status['empty']} without docstring, {status['trivial']} trivial (under {MIN_WORDS} words)")
    print(
        f"  longer than {args.seq_limit} characters: {status['truncated']} cut at a paragraph or sentence end, "
        f"{status['too long']} dropped (no such end within the limit)"
    )
    if test_modules:
        print(f"Test modules not read: {test_modules}")
    if skipped:
        print(f"Skipped modules ({len(skipped)}):")
        for module, reason in sorted(skipped.items()):
            print(f"  {module}: {reason}")


def main(argv=None):
    args = settings.parse(DatasetSettings, argv, "Turn the docstrings of installed packages into "
                                                 "train/valid/test JSONL for lora.py.")
    args.workers = args.workers or min(64, os.cpu_count() or 1)
    paths = dataset_paths(args.out, args.force)
    with utils.claimed_output(args.out, *paths.values()):
        make_dataset(args, paths)


def make_dataset(args, paths):
    modules, test_modules = list_modules(args.packages)

    start = time.perf_counter()
    worker_settings = {
        "modules": frozenset(name for _, name in modules),
        "preprocess": not args.no_preprocess,
        "seq_limit": args.seq_limit,
    }
    with Pool(args.workers, worker_settings) as pool:
        objects, skipped = read_modules(pool, modules, args.import_timeout)
        cleaned = clean_all(pool, objects, args.batch_size)
    examples = make_examples(objects, cleaned, not args.no_preprocess)
    if not examples:
        raise UserError(f"no usable docstrings found in {' '.join(args.packages)}")
    splits = split_examples(examples, args.test_size, args.valid_size, args.seed)
    if args.format == "preference":
        splits = with_rejected(splits, args.seed)
    write_splits(paths, splits, args.format)
    report(args, modules, test_modules, skipped, cleaned, objects, examples, splits, time.perf_counter() - start)


if __name__ == "__main__":
    run_script(main)
