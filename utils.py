"""Helpers shared by every script: user errors, atomic files, JSONL.

Import this module before `mlx.core`: it loads the fast BLAS first (blas.py), which must
be in the process before MLX binds its matmuls.
"""

import blas  # noqa: F401  (first: the fast BLAS before mlx.core)

import atexit
import contextlib
import fcntl
import gc
import json
import os
import shutil
import sys
import tempfile


def _release_mlx_streams():
    """MLX's stream threads must be ended before the interpreter shuts down: since mlx 0.32 it
    no longer does so itself, and a process could abort at exit ("terminate called without an
    active exception") after its work was done."""
    mx = sys.modules.get("mlx.core")
    if mx is not None and hasattr(mx, "clear_streams"):
        mx.clear_streams()


atexit.register(_release_mlx_streams)


class UserError(Exception):
    """A mistake in the user's input: reported in one line, no traceback."""


def run_script(main):
    """A script's `__main__`: run `main()`, user errors reported in one line with exit code 2;
    then leave at once. After the output is flushed and MLX's streams are ended, nothing is
    left to do, and the C++ libraries' own teardown once aborted a finished run ("terminate
    called without an active exception")."""
    code = exit_code(main)
    sys.stdout.flush()
    sys.stderr.flush()
    _release_mlx_streams()
    os._exit(code)


def exit_code(main):
    """Run `main()`: its exit code, or 2 after a user error reported in one line (130 if
    interrupted); anything else propagates."""
    try:
        return main() or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
    except OSError as e:
        # Unwritable folders, full disks, missing files: the user's to fix, in one line.
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
    except MemoryError:
        print("error: out of memory", file=sys.stderr)
    except RuntimeError as e:
        if str(e).startswith(("[ring]", "[mpi]")):  # a collective whose peer went away (distributed.py)
            print(f"error: {e}: another rank stopped (see its output)", file=sys.stderr)
        elif "[malloc" in str(e):  # MLX's allocation failures; anything else is a bug to see
            print(f"error: out of memory ({str(e).splitlines()[0]})", file=sys.stderr)
        else:
            raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 2


def _temporary_prefix(path):
    """Temporaries of `path` are named .NAME.* beside it, so a later run can find them."""
    return f".{os.path.basename(os.path.abspath(path))}."


@contextlib.contextmanager
def file_replaced_when_done(path, suffix=".tmp"):
    """Yield a temporary path beside `path`; when the block succeeds, fsync it and rename it
    over `path`. On any exception the temporary is removed and `path` is untouched; a
    failed write (a full disk, say) is a UserError naming `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=_temporary_prefix(path), suffix=suffix)
    except OSError as e:
        raise UserError(f"{path}: cannot write here ({e.strerror or e})")
    os.close(fd)
    try:
        os.chmod(tmp, _default_file_mode())  # mkstemp makes 0600; give the usual mode
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(folder)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise UserError(f"{path}: not written ({e.strerror or e}); any previous {os.path.basename(path)} "
                            "is intact") from e
        raise


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Open a temporary file beside `path`; on success it replaces `path`, durably."""
    with file_replaced_when_done(path) as tmp, open(tmp, mode) as f:
        yield f


def _umask():
    umask = os.umask(0)  # the only way to read it is to set it
    os.umask(umask)
    return umask


def _default_file_mode():
    return 0o666 & ~_umask()


def _fsync_dir(folder):
    # The rename itself is durable only once the folder's entry is on disk.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_save_arrays(path, arrays, metadata=None):
    """Save a dict of MLX arrays to `path` (.npz, or .safetensors with string `metadata`) atomically."""
    import mlx.core as mx

    ext = os.path.splitext(path)[1]
    with file_replaced_when_done(path, suffix=ext) as tmp:  # mx.savez wants the real extension
        failure = None
        # A failed mx.savez leaves a half-closed ZipFile whose finalizer reports the same
        # error again as "Exception ignored": it is collected here, unheard.
        hook, sys.unraisablehook = sys.unraisablehook, lambda unraisable: None
        try:
            try:
                if ext == ".safetensors":
                    mx.save_safetensors(tmp, arrays, metadata=metadata or {})
                else:
                    mx.savez(tmp, **arrays)
            except (OSError, RuntimeError) as e:  # a full disk, say (MLX's own writer raises RuntimeError)
                failure = OSError(getattr(e, "errno", None), getattr(e, "strerror", None) or str(e))
            gc.collect()
        finally:
            sys.unraisablehook = hook
        if failure is not None:
            raise failure


def load_arrays(path, what="weights"):
    """mx.load a .npz or .safetensors file, with user-facing errors (no pickles involved)."""
    import mlx.core as mx

    if not os.path.exists(path):
        raise UserError(f"{path}: {what} not found")
    try:
        arrays = mx.load(path)
    except Exception as e:  # MLX raises RuntimeError/ValueError for corrupt archives
        raise UserError(f"{path}: cannot read {what} ({e})")
    if not isinstance(arrays, dict):
        raise UserError(f"{path}: expected named arrays in {what}")
    return arrays


def check_fit(path, arrays, expected, what):
    """A UserError unless `arrays` has exactly the names of `expected`, each of its shape."""
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        detail = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        n = len(missing) + len(extra)
        raise UserError(f"{path}: {what} do not fit this model ({detail}{f' and {n - 1} more' if n > 1 else ''})")
    for key, value in expected.items():
        if arrays[key].shape != value.shape:
            raise UserError(f"{path}: {what} do not fit this model ({key} has shape "
                            f"{tuple(arrays[key].shape)}, the model expects {tuple(value.shape)})")


@contextlib.contextmanager
def folder_replaced_when_done(target):
    """Yield a new empty folder beside `target` (same file system); when the block succeeds,
    it becomes `target`. An existing `target` is moved aside first and removed after, so
    `target` is always either the old or the new complete folder; on any exception the new
    one is removed and `target` is untouched, and a failed write is a UserError naming it."""
    parent = os.path.dirname(os.path.abspath(target))
    tmp = tempfile.mkdtemp(dir=parent, prefix=_temporary_prefix(target) + "tmp-")
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the usual mode
        yield tmp
        if not os.path.exists(target) or not os.listdir(target):
            os.replace(tmp, target)  # rename(2) may replace an empty folder
            return
        old = tempfile.mkdtemp(prefix=_temporary_prefix(target) + "old-", dir=parent)
        os.replace(target, old)  # `old` is empty, so this rename replaces it
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        # A failed write inside (a full disk, say) is named by the folder, not by its temporary.
        cause = e if isinstance(e, OSError) else e.__cause__ if isinstance(e, UserError) else None
        if isinstance(cause, OSError):
            raise UserError(f"{target}: not written ({cause.strerror or cause}); any previous "
                            f"{os.path.basename(os.path.abspath(target))} is intact") from e
        raise


def remove_stale_temporaries(path):
    """Remove what an earlier, killed write of `path` left beside it (its .NAME.* temporaries)."""
    folder, prefix = os.path.dirname(os.path.abspath(path)), _temporary_prefix(path)
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        if name.startswith(prefix) and name != prefix + "lock":
            stale = os.path.join(folder, name)
            if os.path.isdir(stale) and not os.path.islink(stale):
                shutil.rmtree(stale, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(stale)


@contextlib.contextmanager
def claimed_output(path, *more):
    """Hold `path` (and the outputs in `more`, written beside it) for this run alone.

    A second run on the same output is refused while this one holds it, instead of
    mixing their files; then the temporaries of killed earlier runs are removed. The
    lock is a file .NAME.lock beside `path`, removed when the block ends. A run that
    fails removes the outputs it created, and the folders it made for them if they are
    left empty; what was there before it stays.
    """
    outputs = (path, *more)
    existed = {p for p in outputs if os.path.lexists(p)}
    folders = {os.path.dirname(os.path.abspath(p)) for p in outputs}
    folders_existed = {f for f in folders if os.path.exists(f)}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    lock_path = os.path.join(os.path.dirname(os.path.abspath(path)), _temporary_prefix(path) + "lock")
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"{path}: cannot write here ({e.strerror or e})")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"{path}: another run is writing this output ({lock_path} is held); "
                            "wait for it to end or choose another output")
        if _same_file(fd, lock_path):
            break
        os.close(fd)  # the lock file was replaced between open and flock: take the new one
    failed = False
    try:
        for p in outputs:
            remove_stale_temporaries(p)
        yield
    except BaseException:
        failed = True
        raise
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        os.close(fd)
        if failed:
            remove_created([p for p in outputs if p not in existed], folders - folders_existed)


def remove_created(paths, folders):
    """Remove the files (or folders) at `paths`, then each of `folders` that is left empty."""
    for p in paths:
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(p)
    for folder in sorted(folders, key=len, reverse=True):
        with contextlib.suppress(OSError):
            os.rmdir(folder)  # only if empty


def _same_file(fd, path):
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def checked_number(value, kind, low, high, where):
    """`value` from a file, checked to be a `kind` (int or float) from `low` to `high`."""
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise UserError(f"{where} must be an integer, got {value!r}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise UserError(f"{where} must be a number, got {value!r}")
    if not low <= value <= high:  # NaN fails this too
        raise UserError(f"{where} must be from {low} to {high}, got {value!r}")
    return kind(value)


def human_bytes(n):
    """A byte count as people read it: 512 B, 3.4 MB, 14.5 GB (decimal units, as disks are sold)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def write_json(path, obj):
    """Write `obj` as indented JSON, atomically."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


# Bounds of the JSON this toolkit reads from files it did not write: deeper nesting or longer
# integers than any real config, header or data line has are refused before they cost anything.
MAX_JSON_DEPTH = 100
MAX_JSON_INT_DIGITS = 40
MAX_JSON_FILE_BYTES = 1 << 30  # tokenizer.json files reach tens of MB


class _BadJSON(ValueError):
    """A bound broken while parsing; the caller names the file."""


def _bounded_int(text):
    if len(text.lstrip("-")) > MAX_JSON_INT_DIGITS:
        raise _BadJSON(f"an integer of {len(text.lstrip('-'))} digits (at most {MAX_JSON_INT_DIGITS})")
    return int(text)


def _unique_keys(pairs):
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _BadJSON(f"the key {repeated(k for k, _ in pairs)[:100]!r} appears twice in one object")
    return obj


def repeated(items):
    """The first of `items` (hashable) that comes twice, or None: names, keys, layers given once each."""
    seen = set()
    for item in items:
        if item in seen:
            return item
        seen.add(item)
    return None


def parse_json(text, where, name_lines=True):
    """A JSON value from untrusted text (str or bytes): at most MAX_JSON_DEPTH deep, integers of
    at most MAX_JSON_INT_DIGITS digits, no repeated keys, every string valid Unicode. Each
    defect is a UserError starting with `where`: a file (its line named too), or a file and the
    line the text is (name_lines=False)."""
    try:
        obj = json.loads(text, parse_int=_bounded_int, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise UserError(f"{where}: JSON nested too deeply")
    except _BadJSON as e:
        raise UserError(f"{where}: {e}")
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: {f'line {e.lineno}: ' if name_lines else ''}invalid JSON ({e.msg})")
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: not UTF-8 text (byte {e.start})")
    _check_tree(obj, where)
    return obj


def _check_tree(obj, where):
    """Depth and Unicode of a parsed JSON value, walked without recursion."""
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise UserError(f"{where}: JSON nested more than {MAX_JSON_DEPTH} deep")
        if isinstance(value, str):
            _check_string(value, where)
        elif isinstance(value, dict):
            for key, item in value.items():
                _check_string(key, where)
                stack.append((item, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)


def _check_string(text, where):
    """JSON's \\ud800 escapes decode to lone surrogates, which no tokenizer or file name can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{where}: a string is not valid Unicode ({text[e.start]!r} at character {e.start})")


def read_json(path, what="file"):
    """Read a JSON object from `path` (parse_json's bounds), with errors that name the file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_FILE_BYTES + 1)
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found")
    if len(raw) > MAX_JSON_FILE_BYTES:
        raise UserError(f"{path}: more than {MAX_JSON_FILE_BYTES} bytes: not a {what}")
    obj = parse_json(raw, path)
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


MAX_JSONL_LINE_BYTES = 16 * 1024 * 1024


def read_jsonl(path, max_line_bytes=MAX_JSONL_LINE_BYTES):
    """Yield (line_number, object) for each non-blank line of a JSONL file.

    Every defect is a UserError naming the file and line: not UTF-8, not JSON,
    not an object, or longer than `max_line_bytes`.
    """
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise UserError(f"{path}: file not found")
    with f:
        for lineno, raw in enumerate(_bounded_lines(f, max_line_bytes, path), start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}: line {lineno}: not UTF-8 (byte {e.start})")
            if not line.strip():
                continue
            obj = parse_json(line, f"{path}: line {lineno}", name_lines=False)
            if not isinstance(obj, dict):
                raise UserError(f"{path}: line {lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def _bounded_lines(f, max_line_bytes, path):
    lineno = 0
    while True:
        raw = f.readline(max_line_bytes + 1)
        if not raw:
            return
        lineno += 1
        if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
            raise UserError(f"{path}: line {lineno}: longer than {max_line_bytes} bytes")
        yield raw
