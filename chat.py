"""Chat templates: a model's Jinja template turns a list of messages into its prompt text.

The template comes with the model (chat_template.jinja in its folder, written by
convert.py from tokenizer_config.json, chat_template.jinja or a GGUF's
tokenizer.chat_template): a stranger's code. It runs in jinja2's immutable
sandbox, which refuses attribute access to Python internals (__class__,
__globals__, ...) and bounds range(); a template that raises, or tries what the
sandbox refuses, is a one-line UserError.
"""

import datetime
import os

from utils import UserError

TEMPLATE_FILE = "chat_template.jinja"
MAX_TEMPLATE_BYTES = 1 << 20


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


def render(template, messages, tokenizer, add_generation_prompt=True, where="chat template"):
    """The prompt text `template` makes of `messages` ([{"role", "content"}, ...])."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    class Sandbox(ImmutableSandboxedEnvironment):
        def unsafe_undefined(self, obj, attribute):
            # The sandbox would render an unsafe attribute as empty: refuse the template instead.
            raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} is unsafe")

    # As transformers renders them: blocks trimmed, loop controls available.
    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=_piece(tokenizer, tokenizer.bos_id), eos_token=_piece(tokenizer, tokenizer.eos_id))
    except jinja2.TemplateError as e:  # syntax errors, raise_exception, and the sandbox's SecurityError
        raise UserError(f"{where}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'failed'}")
    except RecursionError:
        raise UserError(f"{where}: recurses without end")


def _piece(tokenizer, token):
    """The text of a special token, as a template writes it."""
    return "" if token is None else tokenizer.piece(token)
