"""srmap.utils: the one atomic folder writer and the one file hash every module shares."""

from __future__ import annotations

import hashlib
import os

import pytest

from srmap.utils import atomic_dir, sha256_file


def test_atomic_dir_replaces_a_folder_whole_and_keeps_the_umask(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old run")
    old_umask = os.umask(0o027)
    try:
        with atomic_dir(out) as tmp:
            assert tmp.parent == tmp_path and tmp != out and not any(tmp.iterdir())
            (tmp / "new.txt").write_text("new run")
            assert (out / "stale.txt").exists()  # the old folder stays until the new one is complete
    finally:
        os.umask(old_umask)
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert out.stat().st_mode & 0o777 == 0o750
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old folder left


def test_atomic_dir_leaves_nothing_on_error(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "kept.txt").write_text("previous result")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(out) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["kept.txt"]
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "fresh"):
            raise RuntimeError("boom")
    assert not (tmp_path / "fresh").exists()


def test_sha256_file(tmp_path):
    data = os.urandom(3 * (1 << 20) + 17)  # spans several 1 MiB reads
    (tmp_path / "blob").write_bytes(data)
    assert sha256_file(tmp_path / "blob") == hashlib.sha256(data).hexdigest()
    assert sha256_file(tmp_path / "blob", progress=True) == hashlib.sha256(data).hexdigest()
