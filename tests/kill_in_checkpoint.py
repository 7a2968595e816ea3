"""Run lora.py, killed (SIGKILL) in the middle of writing one checkpoint.

    python kill_in_checkpoint.py STEP [lora.py flags ...]

The checkpoint of step STEP is written to its temporary file and the process
dies before that file is renamed into place: the fault the atomic writes must
survive, reached from the test side, with no hook in the toolkit itself.
"""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils  # noqa: E402  (fast BLAS before mlx.core)

import mlx.core as mx  # noqa: E402

import lora  # noqa: E402


def die_after_writing(step):
    real_save = mx.save_safetensors

    def save_then_die(path, arrays, metadata=None):
        real_save(path, arrays, metadata=metadata)
        if f"step-{step:08d}" in os.path.basename(path):
            os.kill(os.getpid(), signal.SIGKILL)

    mx.save_safetensors = save_then_die


if __name__ == "__main__":
    die_after_writing(int(sys.argv[1]))
    utils.run_script(lambda: lora.main(sys.argv[2:]))
