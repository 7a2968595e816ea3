"""What every section uses: the repository's root, a child's memory sampled from /proc, timing,
the rank launcher, the main job's settings, and the stamping and printing of results."""

import datetime
import os
import platform
import subprocess
import tempfile
import time

import blas  # first: the fast BLAS before anything imports mlx.core
import loading
from utils import write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
GiB = 2**30


def read_status(pid):
    """Memory fields of /proc/<pid>/status in bytes (empty once the process is gone)."""
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in ("RssAnon", "RssFile", "VmHWM", "VmRSS"):
                    fields[name] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return fields


def run_sampled(cmd, interval=0.05, stderr=None):
    """Run `cmd`, sampling its memory every `interval` s; return (exit code, seconds, peaks, rusage)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=stderr)
    peaks = {"RssAnon": 0, "RssFile": 0, "VmHWM": 0}
    while True:
        status = read_status(proc.pid)
        for k in peaks:
            peaks[k] = max(peaks[k], status.get(k, 0))
        pid, wait_status, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(interval)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(wait_status)
    return proc.returncode, seconds, peaks, rusage


def disk_bytes(path):
    """Bytes of a file, or of the files in a folder."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))


def best_time(fn, repeats=5):
    fn()  # warm-up: page faults, thread start
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return min(times)


def time_steps(step, batches):
    """Seconds of one pass over `batches`, after a first pass that compiles every shape."""
    for batch in batches:
        step(batch)
    tic = time.perf_counter()
    for batch in batches:
        step(batch)
    return time.perf_counter() - tic


def run_on_ranks(n_ranks, command):
    """`command` on `n_ranks` ranks of a ring over loopback, rank r pinned to core r (one thread
    each): the environment mlx.launch sets (MLX_RANK, MLX_HOSTFILE), without mlx.launch, whose
    0.32 loop polls its children's pipes without pause and takes a core of its own.
    Returns (exit codes, rank 0's stdout, rank 0's stderr)."""
    import socket

    if n_ranks == 1:
        run = subprocess.run(command, capture_output=True, text=True)
        return [run.returncode], run.stdout, run.stderr
    with tempfile.TemporaryDirectory() as tmp:
        hostfile = os.path.join(tmp, "hosts.json")
        sockets = [socket.create_server(("127.0.0.1", 0)) for _ in range(n_ranks)]
        write_json(hostfile, [[f"127.0.0.1:{s.getsockname()[1]}"] for s in sockets])
        for s in sockets:
            s.close()
        procs = [subprocess.Popen(["taskset", "-c", str(rank % os.cpu_count()), *command], text=True,
                                  env=dict(os.environ, MLX_RANK=str(rank), MLX_HOSTFILE=hostfile),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for rank in range(n_ranks)]
        outputs = [p.communicate() for p in procs]
    return [p.returncode for p in procs], *outputs[0]


def add_main_job_args(p):
    """The main job's training settings, shared by the sections that train the default model."""
    p.add_argument("--model", default=loading.DEFAULT_MODEL, help="The default model's folder (4-bit, for QLoRA).")
    p.add_argument("--data", default=os.path.join(ROOT, "data"), help="Folder with the chat train.jsonl.")
    p.add_argument("--batch-size", type=int, default=4, help="Conversations per batch (over all ranks).")
    p.add_argument("--max-seq-length", type=int, default=128, help="Tokens per conversation at most.")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank.")
    p.add_argument("--targets", default="all", help="LoRA targets.")


def commit():
    """The commit measured, with "+changes" when the work tree differs from it."""
    def git(*words):
        return subprocess.run(["git", *words], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "--short=10", "HEAD")
    return f"{head}+changes" if head and git("status", "--porcelain", "--untracked-files=no") else head or None


def stamp(results):
    """`results` with when, the commit, the CPU and the machine they were measured on."""
    results["when"] = datetime.datetime.now().isoformat(timespec="seconds")
    results["commit"] = commit()
    results["cpu"] = blas.cpu_name()
    results["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}"
    return results


def print_table(title, results):
    width = max(len(k) for k in results)
    print(f"\n{title}")
    for key, value in results.items():
        print(f"  {key:<{width}}  {value}")
