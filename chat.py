"""Chat templates: a model's Jinja template turns a list of messages into its prompt text.

The template comes with the model (chat_template.jinja in its folder, written by
convert.py from tokenizer_config.json, chat_template.jinja or a GGUF's
tokenizer.chat_template): a stranger's code. It runs in jinja2's immutable
sandbox, which refuses attribute access to Python internals (__class__,
__globals__, ...), and under limits, so that no template can hang or exhaust the
machine: a deadline per render, a cap on the text and on every string or list it
builds, on the integers it computes and on the numbers range() gives it; no
includes or imports. A template that raises, or passes a limit, is a one-line
UserError.

Not bounded before the fact: a single operation whose result outgrows its inputs
other than by *, **, a width, replace or join (indent or tojson(indent=) over many lines,
printing a list that holds one big string many times): its result is refused only once
made, which can take more memory than the caps.
"""

import contextlib
import datetime
import functools
import json
import os
import re
import time

import jinja2
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.visitor import NodeTransformer

from utils import MAX_JSONL_LINE_BYTES, UserError

TEMPLATE_FILE = "chat_template.jinja"
MAX_TEMPLATE_BYTES = 1 << 20

# Limits of one render. A real template renders one conversation (a JSONL line, at most
# MAX_JSONL_LINE_BYTES) in milliseconds, into text a little longer than its messages.
RENDER_SECONDS = 5.0
MAX_OUTPUT_CHARS = 4 * MAX_JSONL_LINE_BYTES  # the text, and any string built on the way
MAX_ITEMS = 1 << 22  # of any list or dict built; of all range()s together; a width or count asked for
MAX_INT_BITS = 4096  # 1233 digits: printable (Python refuses to print more than 4300)

# A conversation with every role, rendered once when a template is loaded (check).
PROBE = [{"role": "system", "content": "You are a helpful assistant."},
         {"role": "user", "content": "What is ReLU in mlx?"},
         {"role": "assistant", "content": "mlx.nn.ReLU applies the rectified linear unit."},
         {"role": "user", "content": "And softmax?"}]


def load_template(folder):
    """The chat template of a model folder, or None."""
    path = os.path.join(folder, TEMPLATE_FILE)
    if not os.path.isfile(path):
        return None
    if os.path.getsize(path) > MAX_TEMPLATE_BYTES:
        raise UserError(f"{path}: a chat template of more than {MAX_TEMPLATE_BYTES} bytes")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start})")


def render(template, messages, tokenizer, add_generation_prompt=True, where=TEMPLATE_FILE):
    """The prompt text `template` makes of `messages` ([{"role", "content"}, ...])."""
    specials = _specials(tokenizer)
    with _one_line_errors(where):
        return _rendered(template, messages, specials, add_generation_prompt)


def check(template, tokenizer, where):
    """Render PROBE with and without the generation prompt, so that a broken or hostile
    template fails once, when loaded, rather than on some line of the data (and once for the
    splits of a run, which all ask)."""
    _checked(template, tuple(_specials(tokenizer).items()), where)


@functools.lru_cache(maxsize=8)
def _checked(template, specials_items, where):
    specials = dict(specials_items)
    with _one_line_errors(where):
        for add_generation_prompt in (True, False):
            try:
                _rendered(template, PROBE, specials, add_generation_prompt)
            except jinja2.TemplateError:  # Gemma's and Mistral's templates refuse a system turn
                _rendered(template, PROBE[1:], specials, add_generation_prompt)


def _specials(tokenizer):
    """The texts of BOS and EOS, as a template writes them."""
    return {name: "" if token is None else tokenizer.piece(token)
            for name, token in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id))}


class _LimitPassed(Exception):
    """A template passed one of this module's limits (the message says which)."""


@contextlib.contextmanager
def _one_line_errors(where):
    """Whatever a template raises, as a UserError naming `where`."""
    try:
        yield
    except _LimitPassed as e:
        raise UserError(f"{where}: chat template {e}")
    except RecursionError:
        raise UserError(f"{where}: chat template recurses without end")
    except MemoryError:
        raise UserError(f"{where}: chat template ran out of memory")
    except Exception as e:  # noqa: BLE001  the stranger's code: syntax, raise_exception, 1/0, 'a' + 1, ...
        lines = str(e).splitlines()
        raise UserError(f"{where}: chat template {type(e).__name__}: {lines[0][:200] if lines else 'failed'}")


def _rendered(template, messages, specials, add_generation_prompt):
    sandbox, compiled = _compiled(template)
    sandbox.start()
    return sandbox.concat(compiled.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                            **specials))


@functools.lru_cache(maxsize=8)
def _compiled(template):
    """(sandbox, compiled template): a dataset renders one template for every line, so it is
    compiled once; each render restarts the sandbox's limits."""
    sandbox = _Sandbox()
    return sandbox, sandbox.compiled(template)


def _raise_exception(message):
    raise jinja2.TemplateError(message)


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """transformers' tojson: jinja's own escapes <, >, & and ' for HTML, which no prompt wants."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _Sandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox as transformers configures it for chat templates, with
    the limits checked in the hooks the sandbox calls for every call, attribute, item,
    operator and filter, and in those _Guards adds for loops and `~`."""

    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self):
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        # transformers' globals and tojson; lipsum (text of any length, for layout tests) is no chat's need.
        del self.globals["lipsum"]
        self.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, range=self.bounded_range)
        self.filters = {name: self._guarded_filter(name, f) for name, f in dict(self.filters, tojson=_tojson).items()}
        self.finalize = self.emitted
        self.start()

    def start(self):
        """The limits of one render, from now: compiling (which may call filters on constants)
        is bounded by the template's size."""
        self.deadline = time.monotonic() + RENDER_SECONDS
        self.range_left = MAX_ITEMS
        self.emitted_left = MAX_OUTPUT_CHARS

    def compiled(self, template):
        return self.from_string(_Guards().visit(self.parse(template)))

    def tick(self):
        """The deadline: cheap enough for every hook (time.monotonic makes no system call)."""
        if time.monotonic() > self.deadline:
            raise _LimitPassed(f"took longer than {RENDER_SECONDS:g} s to render")

    def unsafe_undefined(self, obj, attribute):
        # The sandbox would render an unsafe attribute as empty: refuse the template instead.
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} is unsafe")

    def getattr(self, obj, attribute):
        self.tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        self.tick()
        return super().getitem(obj, argument)

    def call(self, context, obj, /, *args, **kwargs):
        self.tick()
        if isinstance(getattr(obj, "__self__", None), str):  # str.center(width), str.zfill(width), ...
            _check_counts(*args, *kwargs.values())
            args = _check_growth(obj.__self__, obj.__name__, args)
        return _bounded(super().call(context, obj, *args, **kwargs))

    def wrap_str_format(self, value):
        """str.format and format_map, which the sandbox hands out wrapped (not as a method of the
        string): their widths, in the format string or its arguments, checked too."""
        formatting = super().wrap_str_format(value)
        if formatting is None:
            return None
        _check_widths(value.__self__)

        def checked(*args, **kwargs):
            _check_counts(*args, *kwargs.values())
            return formatting(*args, **kwargs)
        return checked

    def call_binop(self, context, operator, left, right):
        self.tick()
        if operator == "*":
            _check_product(left, right)
        elif operator == "**":
            _check_power(left, right)
        elif operator == "%" and isinstance(left, str):
            _check_widths(left)
            _check_counts(*(right.values() if isinstance(right, dict) else right if isinstance(right, tuple)
                            else [right]))
        return _bounded(super().call_binop(context, operator, left, right))

    def _guarded_filter(self, name, function):
        # Widths and counts come after the filtered value (and the context or environment a filter may take).
        sizes_from = 2 if hasattr(function, "jinja_pass_arg") else 1

        @functools.wraps(function)  # keeps jinja_pass_arg
        def guarded(*args, **kwargs):
            self.tick()
            _check_counts(*args[sizes_from:], *kwargs.values())
            if name == "format":
                _check_widths(args[0])
            if name in ("join", "replace") and len(args) > sizes_from:
                args = (*args[:sizes_from], *_check_growth(args[sizes_from - 1], name, args[sizes_from:]))
            return _bounded(function(*args, **kwargs))
        return guarded

    def bounded_range(self, *args):
        """range(), charged in full against the render's MAX_ITEMS when made: still a
        real range (len, reverse, indexing), and a nested loop runs out after a few rows."""
        numbers = range(*args)
        try:
            self.range_left -= len(numbers)
        except OverflowError:  # more than sys.maxsize numbers
            self.range_left = -1
        if self.range_left < 0:
            raise _LimitPassed(f"asks range() for more than {MAX_ITEMS} numbers in all")
        return numbers

    def emitted(self, value):
        """The text of each {{ }} (jinja's finalize), charged against the render's output
        wherever it goes: macros and {% set %} blocks gather theirs in lists, no hook."""
        text = str(value)
        self.emitted_left -= len(text)
        if self.emitted_left < 0:
            raise _LimitPassed(f"renders more than {MAX_OUTPUT_CHARS} characters")
        return text

    def iterate(self, iterable):
        """A for loop's items, the deadline checked at each (_Guards): a loop's body may call
        no hook at all ({% if 'y' in text %})."""
        for item in iterable:
            self.tick()
            yield item

    def joined(self, *values):
        """The `~` operator (_Guards), bounded as a whole."""
        return self.concat([str(value) for value in values])

    def concat(self, pieces):
        """The text of pieces: a render's output, and what macros, {% set %} and {% filter %}
        blocks collect."""
        kept, size = [], 0
        for piece in pieces:  # counted as they come: the output is a stream
            size += len(piece)
            if size > MAX_OUTPUT_CHARS:
                raise _LimitPassed(f"renders more than {MAX_OUTPUT_CHARS} characters")
            kept.append(piece)
        return "".join(kept)


class _Guards(NodeTransformer):
    """Rewrites a parsed template: loops iterate through _Sandbox.iterate and `~` goes
    through _Sandbox.joined (neither has a sandbox hook); other templates are refused."""

    def visit_For(self, node):
        node = self.generic_visit(node)
        node.iter = _call_sandbox("iterate", node.iter)
        return node

    def visit_Concat(self, node):
        return _call_sandbox("joined", *self.generic_visit(node).nodes)

    def refuse_other_templates(self, node):
        raise _LimitPassed("may not include or import other templates")

    visit_Extends = visit_Include = visit_Import = visit_FromImport = refuse_other_templates


def _call_sandbox(method, *arguments):
    return nodes.Call(nodes.EnvironmentAttribute(method), list(arguments), [], None, None)


def _bounded(value):
    """`value`, unless it is a string, list or dict longer than the limits."""
    if isinstance(value, (str, list, tuple, dict)):
        _check_length(value, len(value))
    return value


def _check_length(like, length):
    """A string like `like` of `length` characters, or a list or dict of `length` items."""
    if isinstance(like, str) and length > MAX_OUTPUT_CHARS:
        raise _LimitPassed(f"builds a string of more than {MAX_OUTPUT_CHARS} characters")
    if not isinstance(like, str) and length > MAX_ITEMS:
        raise _LimitPassed(f"builds a list or dict of more than {MAX_ITEMS} items")


def _check_counts(*values):
    """Integer arguments, which str methods and filters take as widths and counts."""
    if any(isinstance(value, int) and abs(value) > MAX_ITEMS for value in values):
        raise _LimitPassed(f"asks for a width or count of more than {MAX_ITEMS}")


_NUMBER = re.compile(r"\d+")


def _check_widths(fmt):
    """The widths and precisions of a format string ('%0999999999d', '{:>999999999}'): any
    number in it, too long a run of digits refused before it is converted."""
    if any(len(digits) > len(str(MAX_ITEMS)) or int(digits) > MAX_ITEMS for digits in _NUMBER.findall(fmt)):
        raise _LimitPassed(f"asks for a width or count of more than {MAX_ITEMS}")


def _check_product(left, right):
    """`*` before it allocates: repetition of a string or list, or a product of integers."""
    sequence, count = (right, left) if isinstance(right, (str, list, tuple)) else (left, right)
    if isinstance(sequence, (str, list, tuple)) and isinstance(count, int):
        _check_length(sequence, len(sequence) * count)
    elif isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
        raise _LimitPassed(f"computes an integer of more than {MAX_INT_BITS} bits")


def _check_growth(value, name, args):
    """Before `value`.replace(old, new) or sep.join(items) (the method or the filter, whose
    value is the items): the length of the result, which can outgrow its inputs many times.
    Returns `args`, an iterable of items made a list so that it can be measured and still used."""
    if name == "replace" and isinstance(value, str) and len(args) >= 2 and all(isinstance(a, str) for a in args[:2]):
        old, new = args[:2]
        count = value.count(old) if old else len(value) + 1
        _check_length(value, len(value) + count * max(0, len(new) - len(old)))
    elif name == "join" and args and not isinstance(args[0], (str, dict)):
        if isinstance(value, str):  # sep.join(items)
            items, sep = list(args[0]), value
            args = (items, *args[1:])
        else:  # items|join(sep)
            items, sep = value, args[0]
        if isinstance(items, (list, tuple)) and isinstance(sep, str):
            _check_length(sep, len(sep) * max(0, len(items) - 1) + sum(len(str(i)) for i in items[:MAX_ITEMS]))
    return args


def _check_power(base, exponent):
    """`**` before it computes: base.bit_length() * exponent bits at most."""
    if isinstance(base, int) and isinstance(exponent, int) and abs(base) > 1 \
            and base.bit_length() * exponent > MAX_INT_BITS:
        raise _LimitPassed(f"computes an integer of more than {MAX_INT_BITS} bits")
