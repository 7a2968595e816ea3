"""Command-line settings declared once.

Each field of a settings dataclass is one flag: its type, default, help and the
values it may take. The same declaration builds the argparse parser, reads a
`--config` YAML file, and validates every value (type, range, finiteness, choice)
before a script loads or writes anything:

    @dataclass
    class Settings(settings.Settings):
        iters: int = settings.option(1000, "training steps", at_least=1)

    args = settings.parse(Settings, argv, "what the script does")

A value from the command line or the YAML file that does not fit is a UserError
naming the flag (or the file and key) and what it must be.
"""

import argparse
import collections.abc
import dataclasses
import functools
import math
import os
import typing

import utils
from utils import UserError


def option(default, help, *, flags=(), choices=None, at_least=None, at_most=None, above=None, below=None,
           special=None, text=False, allow_empty=False, required=False, metavar=None):
    """A settings field and its flag.

    flags: other spellings (the first flag is always --field-name); choices: the
    allowed values; at_least/at_most/above/below: the range of a number (every
    integer must also fit in 64 bits); special: {value: meaning} of values outside
    the range that mean something (-1: "all"); text: the string must be valid
    Unicode (prompts, not paths); allow_empty: "" is a value (else refused);
    required: no default, must be given.
    """
    meta = dict(help=help, flags=tuple(flags), choices=choices, at_least=at_least, at_most=at_most, above=above,
                below=below, special=special or {}, text=text, allow_empty=allow_empty, required=required,
                metavar=metavar)
    return dataclasses.field(default=default, metadata=meta)


def redefault(cls, name, default):
    """The field `name` of settings class `cls` with another default (a script's own)."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    return dataclasses.field(default=default, metadata=field.metadata)


@dataclasses.dataclass
class Settings:
    """Base of every script's settings: each field is validated when the object is built."""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, check_value(f, hints[f.name], getattr(self, f.name), flag(f)))
        self.check()

    def check(self):
        """Rules between settings; a subclass raises UserError when they are broken."""


def subset(cls, settings):
    """The fields of settings class `cls` (a base of `settings`' class) taken from `settings`: what a
    lower module is given, rather than a whole script's settings."""
    return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(cls)})


def flag(field):
    return "--" + field.name.replace("_", "-")


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are UserErrors: one line, exit code 2, no usage dump."""

    def error(self, message):
        raise UserError(f"{message} (see --help)")


def build_parser(cls, description):
    """The argparse parser of settings class `cls`; flags not given are absent from its result.

    --help lists the flags in groups: those of `cls` itself first, then those of each
    base class (titled by its docstring's first line), each where it was first declared.
    """
    parser = _Parser(description=description, argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML file whose keys are flag names; command-line flags win")
    hints = typing.get_type_hints(cls)
    for owner in _declaring_classes(cls):
        title = owner.__doc__.strip().splitlines()[0].rstrip(".")
        group = parser if owner is cls else parser.add_argument_group(title)
        for f in dataclasses.fields(cls):
            if _first_declared_in(cls, f.name) is owner:
                _add_flag(group, f, _base_type(hints[f.name]))
    return parser


def _declaring_classes(cls):
    return [c for c in cls.__mro__ if issubclass(c, Settings) and c is not Settings]


def _first_declared_in(cls, name):
    return [c for c in _declaring_classes(cls) if name in c.__dict__.get("__annotations__", {})][-1]


def _add_flag(group, field, kind):
    meta = field.metadata
    names = (flag(field),) + meta["flags"]
    help_text = meta["help"] + "".join(f"; {v} = {meaning}" for v, meaning in meta["special"].items())
    if field.default is not None and field.default is not False and not meta["required"]:
        shown = " ".join(field.default) if kind is list else field.default
        help_text += f" (default: {shown})"
    if kind is bool:
        group.add_argument(*names, dest=field.name, action="store_true", help=help_text)
    elif kind is list:
        group.add_argument(*names, dest=field.name, nargs="+", metavar=meta["metavar"], help=help_text)
    else:
        group.add_argument(*names, dest=field.name, type=kind, choices=meta["choices"], metavar=meta["metavar"],
                           help=help_text)


def parse(cls, argv, description):
    """Settings from the command line `argv` over a --config YAML file over the defaults."""
    given = vars(build_parser(cls, description).parse_args(argv))
    config_path = given.pop("config", None)
    values = {}
    if config_path is not None:
        values = read_config(cls, config_path)
    values.update(given)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata["required"] and values.get(f.name) is None:
            raise UserError(f"{flag(f)} is required")
        if f.name in given:  # the command line's, checked with its name
            values[f.name] = check_value(f, hints[f.name], values[f.name], flag(f))
    settings = cls(**values)
    settings.given = frozenset(values)  # what the user set, on the command line or in the file
    return settings


# A --config file is flag names and scalars (or lists of them): bounds far beyond that, which an
# alias bomb or a deeply nested file breaks before it costs anything.
MAX_YAML_DEPTH = 8
MAX_YAML_NODES = 10_000  # counted with every alias expanded


@functools.lru_cache(maxsize=1)
def _bounded_loader():
    """PyYAML's safe loader with its documents bounded in depth and in expanded size, and a
    key given twice in one mapping refused rather than silently overwritten."""
    import yaml

    class Refused(yaml.YAMLError):
        pass

    class BoundedLoader(yaml.SafeLoader):
        def compose_document(self):
            self.depth, self.sizes = 0, {}
            return super().compose_document()

        def compose_node(self, parent, index):
            self.depth += 1
            if self.depth > MAX_YAML_DEPTH:
                raise Refused(f"nested more than {MAX_YAML_DEPTH} deep")
            try:
                node = super().compose_node(parent, index)
            finally:
                self.depth -= 1
            if id(node) not in self.sizes:  # an alias's node is sized once, and counted at each use
                children = node.value if isinstance(node.value, list) else []
                flat = [n for child in children for n in (child if isinstance(child, tuple) else (child,))]
                self.sizes[id(node)] = 1 + sum(self.sizes.get(id(n), 1) for n in flat)
            if self.sizes[id(node)] > MAX_YAML_NODES:
                raise Refused(f"more than {MAX_YAML_NODES} values once its aliases are expanded")
            return node

        def construct_mapping(self, node, deep=False):
            keys = [self.construct_object(key, deep=True) for key, _ in node.value]
            if all(isinstance(k, collections.abc.Hashable) for k in keys):  # others: PyYAML's own error
                twice = utils.repeated(keys)
                if twice is not None:
                    again = [i for i, k in enumerate(keys) if k == twice][1]
                    raise Refused(f"the key {str(twice)[:100]!r} appears twice (again on line "
                                  f"{node.value[again][0].start_mark.line + 1})")
            return super().construct_mapping(node, deep)

    return BoundedLoader


def read_config(cls, path):
    """The settings a YAML file gives (bounded: _bounded_loader), each checked for its field's type and range."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.load(f, Loader=_bounded_loader())  # noqa: S506 (a safe loader, bounded)
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start})")
    except yaml.YAMLError as e:
        raise UserError(f"{path}: invalid YAML ({str(e).splitlines()[0]})")
    except ValueError as e:  # an integer too long for Python to read, say
        raise UserError(f"{path}: unreadable value ({e})")
    except RecursionError:
        raise UserError(f"{path}: invalid YAML (nested too deeply)")
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a mapping of flag names to values")
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in config.items():
        name = str(key).replace("-", "_")
        if name not in by_name:
            raise UserError(f"{path}: unknown key '{key}'")
        values[name] = check_value(by_name[name], hints[name], value, f"{path}: key '{key}'")
    return values


# ----------------------------------------------------------------------------- checks

def _base_type(hint):
    """int, float, str, bool or list (of strings): the type of a field, Optional[...] unwrapped."""
    if typing.get_origin(hint) is list:
        return list
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return _base_type(args[0]) if args else hint


def check_value(field, hint, value, where):
    """`value` for `field`, checked; a UserError naming `where` if it does not fit."""
    meta, kind = field.metadata, _base_type(hint)
    if value is None:
        if typing.get_origin(hint) is typing.Union or meta["required"]:
            return None
        raise UserError(f"{where}: a value is required")
    value = _of_type(kind, value, where)
    for text in value if kind is list else [value] if kind is str else []:
        if not text and not meta["allow_empty"]:
            raise UserError(f"{where}: an empty string is not a value here")
    if meta["choices"] is not None and value not in meta["choices"]:
        raise UserError(f"{where} must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")
    if kind in (int, float) and value not in meta["special"]:
        _check_range(meta, value, where)
    for text in value if kind is list else [value] if kind is str else []:
        try:  # text must be Unicode; a path may hold the undecodable bytes a file name can have
            text.encode("utf-8") if meta["text"] else os.fsencode(text)
        except UnicodeEncodeError:
            raise UserError(f"{where} is not valid Unicode text (undecodable bytes or lone surrogates)")
    return value


def _of_type(kind, value, where):
    if kind is bool:
        if not isinstance(value, bool):  # YAML's quoted "no" is a string, not false
            raise UserError(f"{where}: expected true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: expected an integer, got {value!r}")
        if not -2**63 <= value < 2**63:
            raise UserError(f"{where}: {value} does not fit in a 64-bit integer")
        return value
    if kind is list:
        if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
            raise UserError(f"{where}: expected a non-empty list of strings, got {value!r}")
        return [_of_type(str, v, where) for v in value]
    if kind is float:
        if isinstance(value, str):
            # YAML 1.1 (PyYAML) reads 1e-5, without a dot, as a string
            try:
                value = float(value)
            except ValueError:
                raise UserError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except OverflowError:
            raise UserError(f"{where} must be a finite number, got {value}")
    if not isinstance(value, str):
        raise UserError(f"{where}: expected a string, got {value!r}")
    if "\0" in value:  # no path or text may hold one (the OS refuses it in a path)
        raise UserError(f"{where}: contains a NUL character")
    return value


def _check_range(meta, value, where):
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{where} must be a finite number, got {value}")
    bounds = [("above", lambda b: value > b), ("at_least", lambda b: value >= b),
              ("below", lambda b: value < b), ("at_most", lambda b: value <= b)]
    if all(meta[name] is None or holds(meta[name]) for name, holds in bounds):
        return
    words = " and ".join(f"{name.replace('_', ' ')} {meta[name]}" for name, _ in bounds if meta[name] is not None)
    specials = "".join(f" (or {v} for {meaning})" for v, meaning in meta["special"].items())
    raise UserError(f"{where} must be {words}{specials}, got {value}")


# ----------------------------------------------------------------------------- the flag reference

SCRIPTS = {"convert.py": "convert.ConvertSettings", "lora.py": "lora.LoraSettings", "fuse.py": "fuse.FuseSettings",
           "pretrain.py": "pretrain.PretrainSettings", "cwk_create_dataset.py": "cwk_create_dataset.DatasetSettings"}
REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "docs", "flags.md")


def reference_table(cls):
    """A settings class's flags as a Markdown table: flag, default, values, what it does."""
    hints = typing.get_type_hints(cls)
    rows = ["| flag | default | values | what it does |", "| --- | --- | --- | --- |"]
    for f in dataclasses.fields(cls):
        meta, kind = f.metadata, _base_type(hints[f.name])
        names = ", ".join(f"`{name}`" for name in (flag(f),) + meta["flags"])
        default = "required" if meta["required"] else "" if f.default is None or kind is bool else f"`{_shown(f.default)}`"
        values = " ".join(filter(None, [
            ", ".join(f"`{c}`" for c in meta["choices"]) if meta["choices"] else "",
            " and ".join(f"{name.replace('_', ' ')} {meta[name]}" for name in ("above", "at_least", "below", "at_most")
                         if meta[name] is not None),
            "".join(f"; {v} = {meaning}" for v, meaning in meta["special"].items())]))
        rows.append(f"| {names} | {default} | {values or kind.__name__} | {meta['help'].replace('|', '/')} |")
    return "\n".join(rows)


def _shown(default):
    """A default as the reference shows it: a path inside this checkout relative to it, so that the
    page reads the same in every clone."""
    root = os.path.dirname(REFERENCE)[:-len("docs")]
    return os.path.relpath(default, root) if isinstance(default, str) and default.startswith(root) else default


def reference():
    """docs/flags.md: every script's flags, from their declarations here."""
    import importlib

    parts = ["# Every flag\n", "Made by `python settings.py` from the scripts' settings declarations (a test checks "
             "that it is current). Every script also reads `--config FILE.yaml`, whose keys are flag names; "
             "command-line flags win.\n"]
    for script, path in SCRIPTS.items():
        module, name = path.rsplit(".", 1)
        parts += [f"## {script}\n", reference_table(getattr(importlib.import_module(module), name)) + "\n"]
    return "\n".join(parts)


if __name__ == "__main__":
    with open(REFERENCE, "w") as f:
        f.write(reference())
    print(f"wrote {REFERENCE}")

