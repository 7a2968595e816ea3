"""Run lora.py, one of whose ranks dies (SIGKILL) as it starts a given training step.

    python die_at_step.py RANK STEP [lora.py flags ...]

The fault a data-parallel run must survive, reached from the test side, with no hook in
the toolkit itself: the other ranks must end, not hang.
"""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils  # noqa: E402  (fast BLAS before mlx.core)

import lora  # noqa: E402
import trainer  # noqa: E402


def die_at(rank, step):
    real_step_seed = trainer.step_seed

    def step_seed_or_die(seed, at, at_rank=0):
        if (at_rank, at) == (rank, step):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_step_seed(seed, at, at_rank)

    trainer.step_seed = step_seed_or_die


if __name__ == "__main__":
    die_at(int(sys.argv[1]), int(sys.argv[2]))
    utils.run_script(lambda: lora.main(sys.argv[3:]))
