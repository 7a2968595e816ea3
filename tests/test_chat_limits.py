"""A chat template is a stranger's code: whatever it does ends, soon, in its text or in a
one-line UserError naming it, without exhausting the machine; real templates render as
transformers renders them."""

import contextlib
import json
import signal
import time
from unittest import mock

import pytest
from helpers import CHATML, SMOLLM
from hypothesis import given, settings
from hypothesis import strategies as st

import chat
import dataset
from utils import MAX_JSONL_LINE_BYTES, UserError

WHERE = "models/x/chat_template.jinja"
CHAT = [{"role": "system", "content": "Answer in one line."},
        {"role": "user", "content": "What is <ReLU> & 'softmax' in mlx?"},
        {"role": "assistant", "content": "mlx.nn.ReLU Applies the Rectified Linear Unit."},
        {"role": "user", "content": "And softmax?"}]

# Llama 3's template, cut to messages: the system turn gathered through a namespace, other
# roles refused with raise_exception.
LLAMA3 = ("{{- bos_token }}{%- set ns = namespace(system='') %}"
          "{%- for message in messages %}"
          "{%- if message['role'] == 'system' %}{%- set ns.system = message['content'] | trim %}"
          "{%- elif message['role'] not in ['user', 'assistant'] %}"
          "{{- raise_exception('Only system, user and assistant roles are supported') }}{%- endif %}"
          "{%- endfor %}"
          "{%- if ns.system %}{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + ns.system + '<|eot_id|>' }}"
          "{%- endif %}"
          "{%- for message in messages if message['role'] != 'system' %}"
          "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
          " + '<|eot_id|>' }}{%- endfor %}"
          "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
# Mistral's and Gemma's refuse a system turn and insist on alternating roles.
MISTRAL = ("{{ bos_token }}{% for message in messages %}"
           "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
           "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
         "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
         "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
         "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
         "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
         "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")
# What else real templates use: loop variables, joiner, cycler, dict, tojson, ~, %, str.format,
# range and filters over it, a macro, a {% set %} block.
FEATURES = ("{% set sep = joiner(' | ') %}{% set parity = cycler('odd', 'even') %}"
            "{% macro turn(m) %}{{ m.role ~ '=' ~ m.content | tojson }}{% endmacro %}"
            "{% for m in messages %}{{ sep() }}{{ parity.next() }} {{ loop.index }}/{{ loop.length }} {{ turn(m) }}"
            "{% if loop.last %}.{% endif %}{% endfor %}\n"
            "{% for i in range(messages | length) | reverse %}{{ '%d,' % i }}{{ '{:>3}'.format(i) }}{% endfor %}"
            "{% set roles %}{{ messages | map(attribute='role') | join(',') | upper }}{% endset %}{{ roles }}"
            "{{ dict(a=1, b=[1, 2]) | tojson }}{{ {'k': 'v'} | tojson(indent=2) }}"
            "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + m.content | length %}{% endfor %}"
            "{{ ns.n * 2 ** 3 }}{{ ('-' * 3) ~ (messages[1:] | list | length) }}")
REAL = {"chatml": CHATML, "smollm": SMOLLM, "llama3": LLAMA3, "features": FEATURES}


class Tokenizer:
    """The two special tokens a template is given."""
    bos_id, eos_id = 1, 2

    def piece(self, token):
        return {1: "<s>", 2: "</s>"}[token]


class Hung(BaseException):
    """Not an Exception: chat.render must not be able to turn it into a UserError."""


@contextlib.contextmanager
def finishing_within(seconds):
    """Fail the test (not hang it) when the block runs longer than `seconds`."""
    def hung(signum, frame):
        raise Hung(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def refusal(template, messages=CHAT, limit_s=30):
    """The one-line error that rendering `template` ends in, within `limit_s` seconds."""
    start = time.monotonic()
    with finishing_within(limit_s), pytest.raises(UserError) as error:
        chat.render(template, messages, Tokenizer(), where=WHERE)
    assert time.monotonic() - start < limit_s
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{WHERE}: chat template "), message
    return message


@pytest.fixture
def fast_deadline():
    with mock.patch.object(chat, "RENDER_SECONDS", 0.5):
        yield


# ------------------------------------------------------------------------------ time

def test_a_loop_without_a_call_ends_at_the_deadline():
    # A million searches of a megabyte, and no call, attribute or filter among them: the loop's
    # own check ends it.
    template = "{% set s = 'x' * 1000000 %}{% for a in s %}{% if 'y' in s %}{% endif %}{% endfor %}"
    start = time.monotonic()
    assert refusal(template).endswith(f"took longer than {chat.RENDER_SECONDS:g} s to render")
    assert time.monotonic() - start >= chat.RENDER_SECONDS


@pytest.mark.parametrize("template", [
    "{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}{{ messages[0].role[:0] }}{% endfor %}{% endfor %}",
    ("{% macro f(n) %}{% for i in [1, 2, 3] %}{% if n > 0 %}{{ f(n - 1) }}{% endif %}{% endfor %}{% endmacro %}"
     "{{ f(40) }}"),  # 3^40 calls
    "{% set s = 'xy' * 50000 %}{% for a in s if a == 'x' %}{% for b in s | reverse %}{% endfor %}{% endfor %}",
    "{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
    "{% set s = 'x' * 100000 %}{% for a in s recursive %}{% for b in s %}{% endfor %}{% endfor %}",
    "{% set s = 'x' * 100000 %}{% set t %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}{% endset %}",
])
def test_endless_work_ends_at_the_deadline(fast_deadline, template):
    assert refusal(template, limit_s=20).endswith("took longer than 0.5 s to render")


# ------------------------------------------------------------------------------ memory

@pytest.mark.parametrize("template, message", [
    ("{{ 'x' * 3000000000 }}", f"builds a string of more than {chat.MAX_OUTPUT_CHARS} characters"),
    ("{{ 3000000000 * 'x' }}", f"builds a string of more than {chat.MAX_OUTPUT_CHARS} characters"),
    ("{{ [1] * 10**9 }}", f"builds a list or dict of more than {chat.MAX_ITEMS} items"),
    ("{{ (1, 2) * 10**9 }}", f"builds a list or dict of more than {chat.MAX_ITEMS} items"),
    ("{{ 10 ** 5000 }}", f"computes an integer of more than {chat.MAX_INT_BITS} bits"),
    ("{{ 2 ** (10 ** 12) }}", f"computes an integer of more than {chat.MAX_INT_BITS} bits"),
    ("{% set ns = namespace(x=3) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}{% endfor %}",
     f"computes an integer of more than {chat.MAX_INT_BITS} bits"),
    ("{{ 'x' | center(3000000000) }}", f"asks for a width or count of more than {chat.MAX_ITEMS}"),
    ("{{ 'x'.ljust(3000000000) }}", f"asks for a width or count of more than {chat.MAX_ITEMS}"),
    ("{{ '7'.zfill(10**10) }}", f"asks for a width or count of more than {chat.MAX_ITEMS}"),
    ("{{ '%03000000000d' % 1 }}", f"asks for a width or count of more than {chat.MAX_ITEMS}"),
    ("{{ '%0*d' % (3000000000, 1) }}", f"asks for a width or count of more than {chat.MAX_ITEMS}"),
    ("{{ '%03000000000d' | format(1) }}", f"asks for a width or count of more than {chat.MAX_ITEMS}"),
    ("{{ '{:>3000000000}'.format(1) }}", f"asks for a width or count of more than {chat.MAX_ITEMS}"),
    ("{{ '{:>{}}'.format(1, 3000000000) }}", f"asks for a width or count of more than {chat.MAX_ITEMS}"),
    ("{{ [1] | batch(3000000000, 0) | list }}", f"asks for a width or count of more than {chat.MAX_ITEMS}"),
    ("{{ ('x' * 1000000).replace('', 'y' * 1000) }}", f"builds a string of more than {chat.MAX_OUTPUT_CHARS} characters"),
    ("{{ ('x' * 10000) | replace('', 'y' * 10000) }}", f"builds a string of more than {chat.MAX_OUTPUT_CHARS} characters"),
    ("{{ ('y' * 100000).join(['a'] * 100000) }}", f"builds a string of more than {chat.MAX_OUTPUT_CHARS} characters"),
    ("{{ (['a'] * 100000) | join('y' * 100000) }}", f"builds a string of more than {chat.MAX_OUTPUT_CHARS} characters"),
])
def test_a_value_too_big_to_build_is_refused_before_it_is_built(template, message):
    assert refusal(template).endswith(message)


@pytest.fixture
def small_limits():
    with mock.patch.object(chat, "MAX_OUTPUT_CHARS", 100_000), mock.patch.object(chat, "MAX_ITEMS", 10_000):
        yield


@pytest.mark.parametrize("template, message", [
    ("{% for i in range(1000) %}{{ 'x' * 1000 }}{% endfor %}", "renders more than 100000 characters"),
    ("{% for i in range(1000) %}" + "y" * 1000 + "{% endfor %}", "renders more than 100000 characters"),
    ("{% for m in messages %}{% for i in range(2000) %}{{ m.content }}{% endfor %}{% endfor %}",
     "renders more than 100000 characters"),
    # Doubling, a step at a time, through ~, + and join.
    ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
     "renders more than 100000 characters"),
    ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
     "builds a string of more than 100000 characters"),
    ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = [ns.s, ns.s] | join %}{% endfor %}",
     "builds a string of more than 100000 characters"),
    ("{% set ns = namespace(l=[1]) %}{% for i in range(40) %}{% set ns.l = ns.l + ns.l %}{% endfor %}",
     "builds a list or dict of more than 10000 items"),
    # Text gathered where it is never output, a {% set %} block, a macro's body, a filter block:
    # refused as it is gathered, not once all of it is (when raise_exception would be reached).
    ("{% set t %}{% for i in range(1000) %}{{ 'x' * 1000 }}{% endfor %}{{ raise_exception('all') }}{% endset %}",
     "renders more than 100000 characters"),
    (("{% macro m() %}{% for i in range(1000) %}{{ 'x' * 1000 }}{% endfor %}{{ raise_exception('all') }}"
      "{% endmacro %}{{ m() | length }}"), "renders more than 100000 characters"),
    (("{% filter length %}{% for i in range(1000) %}{{ 'x' * 1000 }}{% endfor %}{{ raise_exception('all') }}"
      "{% endfilter %}"), "renders more than 100000 characters"),
])
def test_text_past_the_cap_is_refused_as_it_grows(small_limits, template, message):
    assert refusal(template).endswith(message)


def test_a_conversation_as_long_as_a_jsonl_line_renders():
    content = "x" * (MAX_JSONL_LINE_BYTES - 1000)
    messages = [{"role": "user", "content": content}, {"role": "assistant", "content": "ok"}]
    assert len(chat.render(SMOLLM, messages, Tokenizer(), where=WHERE)) > len(content)


# ------------------------------------------------------------------------------ range

@pytest.mark.parametrize("template", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{{ range(10**12) | length }}",
    "{{ range(1, 10**30, 2) }}",
    "{% for i in range(3000) %}{% for j in range(3000) %}{% endfor %}{% endfor %}",
    "{% for i in range(10) %}{{ range(" + str(chat.MAX_ITEMS // 4) + ") | length }}{% endfor %}",
])
def test_range_gives_a_render_a_bounded_number_of_numbers_in_all(template):
    assert refusal(template).endswith(f"asks range() for more than {chat.MAX_ITEMS} numbers in all")


def test_range_is_still_a_range():
    template = "{{ range(5) | length }}{{ range(2, 9, 3) | list }}{{ range(3)[-1] }}{{ range(3) | reverse | list }}"
    assert chat.render(template, CHAT, Tokenizer()) == "5[2, 5, 8]2[2, 1, 0]"


# ------------------------------------------------------------------------------ other templates

@pytest.mark.parametrize("template", [
    "{% include 'x' %}", "{% import 'x' as y %}{{ y.f() }}", "{% from 'x' import f %}", "{% extends 'x' %}",
    "{% for m in messages %}{% if m.role == 'nobody' %}{% include m.content %}{% endif %}{% endfor %}",
])
def test_a_chat_template_may_not_include_or_import_another(template):
    assert refusal(template).endswith("may not include or import other templates")


# ------------------------------------------------------------------------------ globals

def test_lipsum_is_gone_and_what_real_templates_call_is_there():
    assert "UndefinedError: 'lipsum' is undefined" in refusal("{{ lipsum(10**6, html=false) }}")
    text = chat.render("{{ namespace(a=1).a }}{{ cycler(1, 2).next() }}{% set j = joiner('+') %}{{ j() }}{{ j() }}"
                       "{{ dict(b=2).b }}{{ strftime_now('%Y') }}{{ range(2) | list }}", CHAT, Tokenizer())
    assert text == f"11+2{time.strftime('%Y')}[0, 1]"


# ------------------------------------------------------------------------------ errors

class Unprintable:
    def __init__(self, error):
        self.error = error

    def __str__(self):
        raise self.error


@pytest.mark.parametrize("template, message", [
    ("{{ 1/0 }}", "ZeroDivisionError: division by zero"),
    ("{{ 'a' + 1 }}", "TypeError: can only concatenate str (not \"int\") to str"),
    ("{{ 2.0 ** 100000 }}", "OverflowError"),
    ("{{ 'abc'.index('z') }}", "ValueError: substring not found"),
    ("{{ range(1, 2, 0) }}", "ValueError: range() arg 3 must not be zero"),
    ("{{ none.x.y }}", "UndefinedError: 'None' has no attribute 'x'"),
    ("{{ raise_exception('Conversation roles must alternate') }}", "TemplateError: Conversation roles must alternate"),
    ("{{ raise_exception('first\nsecond') }}", "TemplateError: first"),
    ("{% for m in messages %}", "TemplateSyntaxError: Unexpected end of template"),
    ("{{ messages.__class__.__mro__ }}", "SecurityError: access to attribute '__class__' of a list is unsafe"),
    ("{{ ''.__class__.__subclasses__() }}", "SecurityError"),
    ("{{ messages.append(1) }}", "SecurityError"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recurses without end"),
    ("{% for x in [1] recursive %}{{ loop([1]) }}{% endfor %}", "recurses without end"),
])
def test_whatever_a_template_raises_is_one_line_naming_it(template, message):
    assert message in refusal(template)


@pytest.mark.parametrize("error, message", [(MemoryError(), "ran out of memory"),
                                            (RecursionError(), "recurses without end"),
                                            (KeyError("role"), "KeyError: 'role'")])
def test_errors_raised_while_printing_a_value_are_one_line_too(error, message):
    messages = [{"role": "user", "content": Unprintable(error)}]
    assert refusal("{{ messages[0].content }}", messages).endswith(message)


def test_the_sandbox_is_still_the_sandbox():
    assert chat.render("{{ messages[0].role }}{{ messages | length }}", CHAT, Tokenizer()) == "system4"
    assert "SecurityError" in refusal("{{ raise_exception.__globals__ }}")
    assert "SecurityError" in refusal("{{ range.__self__ }}")


# ------------------------------------------------------------------------------ real templates

@pytest.mark.parametrize("name", sorted(REAL))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_real_templates_render_as_transformers_renders_them(name, add_generation_prompt):
    transformers = pytest.importorskip("transformers.utils.chat_template_utils")
    [expected], _ = transformers.render_jinja_template([CHAT], chat_template=REAL[name], bos_token="<s>",
                                                       eos_token="</s>", add_generation_prompt=add_generation_prompt)
    assert chat.render(REAL[name], CHAT, Tokenizer(), add_generation_prompt) == expected


def test_a_llama3_template_renders_its_system_turn_first():
    assert chat.render(LLAMA3, CHAT[1:2] + CHAT[:1], Tokenizer()) == (
        "<s><|start_header_id|>system<|end_header_id|>\n\nAnswer in one line.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is <ReLU> & 'softmax' in mlx?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert "TemplateError: Only system, user and assistant roles" in refusal(
        LLAMA3, [{"role": "tool", "content": "42"}])


def test_tojson_writes_text_as_it_is():
    assert chat.render("{{ messages[1].content | tojson }}", CHAT, Tokenizer()) == json.dumps(
        CHAT[1]["content"], ensure_ascii=False)


# ------------------------------------------------------------------------------ checked once, when loaded

@pytest.mark.parametrize("template", [CHATML, SMOLLM, LLAMA3, MISTRAL, GEMMA, FEATURES])
def test_real_templates_pass_the_check_even_when_they_refuse_a_system_turn(template):
    chat.check(template, Tokenizer(), WHERE)


@pytest.mark.parametrize("template, message", [
    ("{{ raise_exception('never') }}", "TemplateError: never"),
    ("{% for m in messages %}{% if m.role == 'assistant' %}{{ 1 / 0 }}{% endif %}{% endfor %}",
     "ZeroDivisionError"),
    ("{% if not add_generation_prompt %}{{ 'a' + 1 }}{% endif %}", "TypeError"),
    ("{% include 'other.jinja' %}", "may not include or import other templates"),
])
def test_a_broken_template_fails_the_check(template, message):
    with pytest.raises(UserError, match=f"^{WHERE}: chat template .*{message}"):
        chat.check(template, Tokenizer(), WHERE)


def test_a_split_is_refused_before_its_first_line_when_the_template_is_broken(tmp_path, fast_deadline):
    # Tokenizer() cannot encode: a line tokenized before the check would fail otherwise.
    (tmp_path / "train.jsonl").write_text(json.dumps({"messages": CHAT[:3]}) + "\n")
    hang = "{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}"
    with finishing_within(30), pytest.raises(UserError) as error:
        dataset.load_split(str(tmp_path), "train", Tokenizer(), 2048, False, hang)
    assert str(error.value) == (f"the model's {chat.TEMPLATE_FILE}, on a short conversation: "
                                "chat template took longer than 0.5 s to render")


# ------------------------------------------------------------------------------ any template

TEXT = st.text(alphabet="ab xy\n-{}%'", max_size=8)
ATOMS = st.one_of(
    st.integers(-3, 12).map(str), st.integers(-10**12, 10**12).map(str),
    st.text(alphabet="ab <>'\"\\\n-%{}:0123456789", max_size=6).map(repr),
    st.sampled_from(["messages", "m", "m.content", "m['role']", "messages[0]", "add_generation_prompt",
                     "bos_token", "ns.v", "loop.index", "none", "true", "[1, 2, 'a']", "{'a': 1}",
                     "range(5)", "range(10**6)", "'ab' * 1000", "'ab' * 40000", "namespace(v=1)", "undefined_name"]))
OPERATORS = ["+", "-", "*", "/", "//", "%", "**", "~", "==", "<", "in", "and", "or"]
FILTERS = ["length", "upper", "list", "string", "join(',')", "center(1000)", "center(10**9)", "replace('a', 'bbb')",
           "replace('', 'xx')", "first", "last", "reverse", "trim", "int", "float", "sum", "batch(3)", "indent(4)",
           "format(1)", "tojson", "tojson(indent=2)", "sort", "unique", "wordwrap(5)", "slice(3)", "map('string')",
           "select", "default('d')", "truncate(5)", "abs", "round", "items", "count", "dictsort", "wordcount"]
METHODS = ["upper()", "split()", "split('a')", "ljust(50)", "ljust(10**10)", "format(1, 'x')", "startswith('a')",
           "strip()", "zfill(10**9)", "items()", "get('a')", "keys()", "count('a')", "replace('a', 'bb')",
           "join(['a', 'b'])"]


def expressions(inner):
    return st.one_of(
        st.tuples(inner, st.sampled_from(OPERATORS), inner).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(inner, st.sampled_from(FILTERS)).map(lambda t: f"({t[0]}) | {t[1]}"),
        st.tuples(inner, st.sampled_from(METHODS)).map(lambda t: f"({t[0]}).{t[1]}"),
        st.tuples(inner, inner).map(lambda t: f"({t[0]})[{t[1]}]"),
        inner.map(lambda e: f"raise_exception({e})"))


EXPRESSIONS = st.recursive(ATOMS, expressions, max_leaves=6)


def statements(body):
    return st.one_of(
        EXPRESSIONS.map(lambda e: "{{ " + e + " }}"),
        st.tuples(EXPRESSIONS, body).map(lambda t: "{% for m in " + t[0] + " %}" + t[1] + "{% endfor %}"),
        st.tuples(EXPRESSIONS, body, body).map(lambda t: "{% if " + t[0] + " %}" + t[1] + "{% else %}" + t[2]
                                               + "{% endif %}"),
        EXPRESSIONS.map(lambda e: "{% set ns.v = " + e + " %}"),
        body.map(lambda b: "{% set kept %}" + b + "{% endset %}{{ kept | length }}"),
        body.map(lambda b: "{% macro f(m) %}" + b + "{% endmacro %}{{ f(1) }}{{ f(messages) }}"))


TEMPLATES = st.recursive(TEXT, lambda body: st.lists(statements(body) | TEXT, max_size=4).map("".join),
                         max_leaves=8).map(lambda body: "{% set ns = namespace(v=0) %}" + body)


@settings(max_examples=150, deadline=None)
@given(template=TEMPLATES)
def test_any_template_renders_within_the_limits_or_fails_in_one_line(template):
    with mock.patch.object(chat, "RENDER_SECONDS", 0.5), mock.patch.object(chat, "MAX_OUTPUT_CHARS", 100_000), \
            mock.patch.object(chat, "MAX_ITEMS", 10_000):
        start = time.monotonic()
        try:
            with finishing_within(20):
                text = chat.render(template, CHAT, Tokenizer(), where=WHERE)
        except UserError as e:
            assert "\n" not in str(e) and str(e).startswith(f"{WHERE}: chat template ")
        else:
            assert isinstance(text, str) and len(text) <= chat.MAX_OUTPUT_CHARS
        assert time.monotonic() - start < chat.RENDER_SECONDS + 5
