"""Several processes training as one, over MLX's own engine (mx.distributed).

`mlx.launch` (ring backend: a host file, one process per entry) or `mpirun` starts
the same script on every rank; init() joins them. Each training step every rank
takes its slice of the same global batch, and the adapters' gradients are summed
across ranks (trainer.py). Rank 0 alone writes files and reports progress; the
others print only their errors, marked with their rank.

A peer that never connects would leave mx.distributed.init waiting forever: init gives
up after CONNECT_TIMEOUT with a one-line error. A peer that dies breaks the ring's
sockets: the next collective raises, which utils reports in one line.
"""

import os
import select
import signal
import sys
from dataclasses import dataclass

import utils  # noqa: F401  (fast BLAS before mlx.core)
from utils import UserError

import mlx.core as mx

# Set by the launchers: ring (mlx.launch, or by hand), MPI (Open MPI, MPICH).
LAUNCHER_VARIABLES = ("MLX_HOSTFILE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
CONNECT_TIMEOUT = float(os.environ.get("MLX_LORA_CONNECT_TIMEOUT", "120"))  # seconds


@dataclass(frozen=True)
class World:
    """The ranks of this run: `group` is None for a single process."""
    group: object = None
    rank: int = 0
    size: int = 1

    @property
    def is_writer(self):
        return self.rank == 0

    def all_sum(self, x):
        return x if self.group is None else mx.distributed.all_sum(x, group=self.group)

    def all_max(self, x):
        return x if self.group is None else mx.distributed.all_max(x, group=self.group)

    def check_agreement(self, digests):
        """A UserError on every rank unless all ranks hold the same {what: hex digest}: ranks given
        other data, settings or base weights would train one model on different things."""
        if self.group is None:
            return
        for what, digest in digests.items():
            chunks = mx.array([int(digest[i:i + 4], 16) for i in range(0, 32, 4)], dtype=mx.int32)  # 8 x 16 bits
            if not mx.array_equal(self.all_max(chunks) * self.size, self.all_sum(chunks)).item():
                raise UserError(f"rank {self.rank}: the ranks were given different {what}: each must have the "
                                "same files and settings")


_world = World()


def current():
    """The World init() joined, or a single process."""
    return _world


def launched():
    return any(os.environ.get(name) for name in LAUNCHER_VARIABLES)


def init():
    """Join the other ranks when a launcher started this process (else a single process);
    ranks other than 0 are silenced but for their errors."""
    global _world
    if not launched() or _world.group is not None:
        return _world
    group = _join_within(CONNECT_TIMEOUT)
    _world = World(group, group.rank(), group.size())
    if _world.rank != 0:
        sys.stdout = open(os.devnull, "w")
        sys.stderr = ErrorsOnly(sys.stderr, _world.rank)
    return _world


def _join_within(seconds):
    """mx.distributed.init, or a one-line error and the end of this process after `seconds`
    without every peer. init holds the interpreter while it waits, so the watchdog is a
    forked process: it waits for the end of a pipe this process closes once it has joined."""
    joined, still_joining = os.pipe()
    watchdog = os.fork()
    if watchdog == 0:
        os.close(still_joining)
        if not select.select([joined], [], [], seconds)[0]:
            os.write(2, f"error: rank {os.environ.get('MLX_RANK', '?')}: not every rank connected within "
                        f"{seconds:.0f} s (MLX_LORA_CONNECT_TIMEOUT): is every host of the host file up and "
                        "reachable?\n".encode())
            os.kill(os.getppid(), signal.SIGKILL)
        os._exit(0)
    os.close(joined)
    group = mx.distributed.init(strict=True)
    os.close(still_joining)
    os.waitpid(watchdog, 0)
    return group


class ErrorsOnly:
    """A rank's stderr that passes on only its error lines (and tracebacks), marked with its
    rank: rank 0 alone reports progress."""

    def __init__(self, stream, rank):
        self.stream, self.rank, self.line, self.traceback = stream, rank, "", False

    def write(self, text):
        self.line += text
        *lines, self.line = self.line.split("\n")
        for line in lines:
            self.traceback = self.traceback or line.startswith("Traceback")
            if self.traceback or line.startswith("error:"):
                self.stream.write(f"[rank {self.rank}] {line}\n")
        return len(text)

    def flush(self):
        self.stream.flush()

    def isatty(self):
        return False
