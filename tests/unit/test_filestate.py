"""The file facts validated_file compares with, run here with a real shell on a temporary directory."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from roles._lib import DirectoryFiles, FileState


def answer(fact, **kwargs):
    out = subprocess.run(["sh", "-c", fact.command(**kwargs).get_raw_value()], capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    return fact.process(lines) if lines else fact.default() if callable(getattr(fact, "default", None)) else None


def test_directory_listing_agrees_with_the_single_file_fact(tmp_path: Path):
    (tmp_path / "a.conf").write_text("hello\n")
    os.chmod(tmp_path / "a.conf", 0o640)
    (tmp_path / "with space").write_text("")
    (tmp_path / "big").write_bytes(b"x" * (DirectoryFiles.HASHED_UP_TO + 1))
    (tmp_path / "link").symlink_to("a.conf")
    (tmp_path / "sub").mkdir()
    listing = answer(DirectoryFiles(), path=str(tmp_path))
    single = answer(FileState(), path=str(tmp_path / "a.conf"))
    assert single["sha1"] == hashlib.sha1(b"hello\n").hexdigest() and single["mode"] == "640"
    entry = listing["a.conf"]
    assert {k: entry[k] for k in ("mode", "user", "group", "sha1")} == single
    assert listing["with space"]["sha1"] == hashlib.sha1(b"").hexdigest()
    assert "sha1" not in listing["big"]  # too big to hash in the listing: asked alone
    assert listing["link"]["type"] == "l" and listing["sub"]["type"] == "d"
    assert answer(FileState(), path=str(tmp_path / "link")) is False
    assert answer(FileState(), path=str(tmp_path / "missing")) is None


def test_a_missing_directory_lists_nothing(tmp_path: Path):
    assert answer(DirectoryFiles(), path=str(tmp_path / "nope")) == {}
