"""Shared helpers: fast BLAS, atomic writes, JSONL limits, the one-line error boundary."""

import os
import platform
import subprocess
import sys

import pytest

import utils
from utils import UserError


@pytest.mark.skipif(platform.system() != "Linux", reason="macOS uses Accelerate")
def test_fast_blas_is_loaded_before_mlx():
    """setup.sh installs a fast BLAS; importing utils first must put it in this process."""
    assert utils.BLAS_PATH, "no fast BLAS found: run setup.sh"
    with open("/proc/self/maps") as f:
        assert os.path.realpath(utils.BLAS_PATH) in f.read()


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with utils.atomic_write(str(target), "w") as f:
            f.write("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]  # no temporary left behind


def test_atomic_write_replaces_on_success(tmp_path):
    target = tmp_path / "out.txt"
    with utils.atomic_write(str(target), "w") as f:
        f.write("new")
    assert target.read_text() == "new"
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(target).st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_jsonl_line_limit_and_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert [n for n, _ in utils.read_jsonl(str(path))] == [1, 3]
    path.write_text('{"a": 1}\n{"a": "' + "x" * 200 + '"}\n')
    with pytest.raises(UserError, match="line 2: longer than 100 bytes"):
        list(utils.read_jsonl(str(path), max_line_bytes=100))


def test_run_script_turns_user_and_os_errors_into_one_line(tmp_path):
    script = ("import utils\n"
              "def main():\n"
              "    open(%r + '/missing/x', 'w')\n"
              "utils.run_script(main)\n") % str(tmp_path)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(utils.__file__)))
    assert run.returncode == 2
    assert run.stderr.startswith("error: ") and "missing/x" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
