"""DIV2K download against a local HTTP server (Range, dropped connections), checksums, safe extraction."""

import hashlib
import io
import socket
import zipfile

import numpy as np
import pytest
from PIL import Image

from srmap import download
from srmap.download import (ARCHIVES_ENV, ChecksumError, DownloadError, download_div2k, extract_pngs,
                            fetch_archive)

MAXPIX = 1_000_000


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 6, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _zip(members: dict[str, bytes], links: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name in links:
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            info.external_attr = 0o120777 << 16  # a symbolic link
            zf.writestr(info, "../../etc/passwd")
    return buf.getvalue()


@pytest.fixture
def fake_div2k(monkeypatch, tmp_path):
    """Replace the DIV2K metadata by two tiny archives (train 1-3, valid 4-5) and return their bytes."""
    monkeypatch.delenv(ARCHIVES_ENV, raising=False)
    archives = {}
    for split, folder, ids in (("train", "DIV2K_train_HR", (1, 3)), ("valid", "DIV2K_valid_HR", (4, 5))):
        data = _zip({f"{folder}/": b"", **{f"{folder}/{i:04d}.png": _png(i) for i in range(ids[0], ids[1] + 1)}})
        name = f"{folder}.zip"
        archives[name] = data
        monkeypatch.setitem(download.DIV2K, split, {
            "url": f"http://127.0.0.1:9/{name}", "archive": name, "folder": folder, "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "ids": list(ids)})
    return archives


def test_full_download_and_extraction(server, fake_div2k, tmp_path):
    base, handler = server
    handler.files.update(fake_div2k)
    out = download_div2k(tmp_path / "hr", archives_dir=tmp_path / "arch", base_url=base, progress=False)
    assert [p.name for p in out["train"]] == ["0001.png", "0002.png", "0003.png"]
    assert [p.name for p in out["valid"]] == ["0004.png", "0005.png"]
    assert (tmp_path / "hr" / "valid" / "0005.png").read_bytes() == _png(5)
    assert sorted(p.name for p in (tmp_path / "arch").iterdir()) == ["DIV2K_train_HR.zip", "DIV2K_valid_HR.zip"]
    assert sorted(p.name for p in (tmp_path / "hr").iterdir()) == ["train", "valid"]  # no temp folders
    n_requests = len(handler.log)
    subset = download_div2k(tmp_path / "hr2", splits=("train",), ids={"train": (2, 3)},
                            archives_dir=tmp_path / "arch", base_url=base, progress=False)
    assert [p.name for p in subset["train"]] == ["0002.png", "0003.png"]
    assert len(handler.log) == n_requests  # verified archives are reused, not fetched again


def test_cut_transfer_is_resumed_with_range(server, tmp_path):
    base, handler = server
    data = np.random.default_rng(0).bytes(300_000)
    handler.files["big.bin"] = data
    handler.drop["big.bin"] = 100_000
    dest = fetch_archive(f"{base}/big.bin", tmp_path / "big.bin", size=len(data),
                         sha256=hashlib.sha256(data).hexdigest(), backoff=0, progress=False)
    assert dest.read_bytes() == data
    assert handler.log == [("big.bin", None), ("big.bin", "bytes=100000-")]
    assert not (tmp_path / "big.bin.part").exists()
    # a part file left by an earlier, killed process is resumed too
    (tmp_path / "again.bin.part").write_bytes(data[:123])
    fetch_archive(f"{base}/big.bin", tmp_path / "again.bin", size=len(data), sha256=None, progress=False)
    assert handler.log[-1] == ("big.bin", "bytes=123-")
    assert (tmp_path / "again.bin").read_bytes() == data


def test_checksum_mismatch_is_clear_and_leaves_nothing(server, fake_div2k, monkeypatch, tmp_path):
    base, handler = server
    handler.files.update(fake_div2k)
    bad = dict(download.DIV2K["train"], sha256="0" * 64)
    monkeypatch.setitem(download.DIV2K, "train", bad)
    with pytest.raises(ChecksumError, match=r"DIV2K_train_HR.zip.part: SHA-256 [0-9a-f]{64}, expected 0{64}"):
        download_div2k(tmp_path / "hr", archives_dir=tmp_path / "arch", base_url=base, progress=False)
    assert not (tmp_path / "hr").exists()
    assert list((tmp_path / "arch").iterdir()) == []
    # a hand-placed archive that does not match is reported by name, not overwritten
    (tmp_path / "arch" / "DIV2K_train_HR.zip").write_bytes(fake_div2k["DIV2K_valid_HR.zip"])
    with pytest.raises(ChecksumError, match=r"arch/DIV2K_train_HR.zip: \d+ bytes, expected"):
        download_div2k(tmp_path / "hr", archives_dir=tmp_path / "arch", base_url=base, progress=False)


def test_offline_error_then_hand_placed_archives(fake_div2k, monkeypatch, tmp_path):
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(DownloadError, match=rf"{dead}/DIV2K_train_HR.zip.*place it at.*{ARCHIVES_ENV}"):
        download_div2k(tmp_path / "hr", archives_dir=tmp_path / "arch", base_url=dead, retries=2, backoff=0,
                       progress=False)
    placed = tmp_path / "by_hand"
    placed.mkdir()
    for name, data in fake_div2k.items():
        (placed / name).write_bytes(data)
    monkeypatch.setenv(ARCHIVES_ENV, str(placed))
    out = download_div2k(tmp_path / "hr", archives_dir=tmp_path / "arch", base_url=dead, progress=False)
    assert len(out["train"]) == 3 and len(out["valid"]) == 2


def test_missing_url_fails_without_retrying(server, tmp_path):
    base, handler = server
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch_archive(f"{base}/nope.zip", tmp_path / "nope.zip", size=None, sha256=None, progress=False)
    assert len(handler.log) == 1


@pytest.mark.parametrize("member,why", [("DIV2K_train_HR/../../evil.png", "'..'"),
                                        ("/abs/evil.png", "absolute"),
                                        ("C:\\evil.png", "drive")])
def test_path_traversal_members_are_rejected(tmp_path, member, why):
    archive = tmp_path / "a.zip"
    archive.write_bytes(_zip({"DIV2K_train_HR/0001.png": _png(1), member: _png(2)}))
    with pytest.raises(ValueError, match=f"unsafe member.*{why}"):
        extract_pngs(archive, tmp_path / "out" / "train", max_pixels=MAXPIX, progress=False)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    assert not (tmp_path / "evil.png").exists()


def test_symlink_member_is_rejected(tmp_path):
    archive = tmp_path / "a.zip"
    archive.write_bytes(_zip({"x/0001.png": _png(1)}, links=("x/0002.png",)))
    with pytest.raises(ValueError, match="symbolic link"):
        extract_pngs(archive, tmp_path / "out", max_pixels=MAXPIX, progress=False)


def test_undecodable_member_leaves_no_output(tmp_path):
    archive = tmp_path / "a.zip"
    archive.write_bytes(_zip({"x/0001.png": _png(1), "x/0002.png": _png(2)[:40]}))
    with pytest.raises(ValueError, match="member x/0002.png is not a usable PNG"):
        extract_pngs(archive, tmp_path / "out", max_pixels=MAXPIX, progress=False)
    assert list(tmp_path.iterdir()) == [archive]
    with pytest.raises(ValueError, match=r"1 expected PNG\(s\) missing, e.g. \['0009.png'\]"):
        extract_pngs(archive, tmp_path / "out", max_pixels=MAXPIX, names={"0001.png", "0009.png"}, progress=False)
