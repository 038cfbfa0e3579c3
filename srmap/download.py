"""DIV2K HR download: resumable, verified archive fetch and safe PNG extraction.

``fetch_archive`` downloads to ``<dest>.part`` (resuming it with an HTTP Range
request after a dropped connection or a restart), checks the size and SHA-256
and only then renames it to ``dest``. ``extract_pngs`` writes the PNGs flat into
a temporary folder, decodes each one, and renames the folder into place, so a
failure never leaves a half-extracted split behind.

Offline: put ``DIV2K_train_HR.zip`` / ``DIV2K_valid_HR.zip`` in a folder and
set ``SRMAP_DIV2K_ARCHIVES`` to it (or put them in ``data/archives``); they are
verified against ``srmap/div2k.json`` and used instead of downloading.
``SRMAP_DIV2K_JSON`` names a replacement for that file (a mirror's URLs, or the
stand-in archives of scripts/rehearse_paper.py with their own checksums).
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from typing import Collection, Sequence

from tqdm import tqdm

from srmap.imageio import DEFAULT_MAX_PIXELS
from srmap.utils import atomic_dir, read_metadata, sha256_file

ARCHIVES_ENV = "SRMAP_DIV2K_ARCHIVES"  # folder holding hand-placed DIV2K zips
METADATA_ENV = "SRMAP_DIV2K_JSON"  # a replacement for srmap/div2k.json (mirrors, the paper-path rehearsal)
_CHUNK = 1 << 20  # bytes per read/write
_BYTES_PER_PIXEL = 8  # largest PNG pixel (16-bit RGBA); bounds a member's honest decompressed size


def _load_metadata() -> dict[str, dict]:
    """Per split ('train', 'valid'): url, archive, folder, size, sha256 and ids, from div2k.json."""
    meta = read_metadata(Path(__file__).with_name("div2k.json"), METADATA_ENV)
    return {split: entry for split, entry in meta.items() if not split.startswith("_")}


DIV2K: dict[str, dict] = _load_metadata()


class DownloadError(OSError):
    """A URL could not be fetched after all retries (the message says how to place the file by hand)."""


class ChecksumError(ValueError):
    """A file's size or SHA-256 differs from the recorded value."""


class _Incomplete(OSError):
    """The server closed the connection before sending the whole body (retried with a Range request)."""


def verify_file(path: Path, *, size: int | None, sha256: str | None, progress: bool = False) -> None:
    """Raise ChecksumError naming ``path`` unless its size and SHA-256 match (None skips a check).

    ``sha256`` is the full hex digest, or a published prefix of it (at least 8
    hex digits, as BasicSR appends to its weight file names).
    """
    if sha256 is not None and not (8 <= len(sha256) <= 64 and all(c in "0123456789abcdefABCDEF" for c in sha256)):
        raise ValueError(f"verify_file: sha256 must be 8 to 64 hex digits, got {sha256!r}")
    actual = os.path.getsize(path)
    if size is not None and actual != size:
        raise ChecksumError(f"{path}: {actual} bytes, expected {size}; the file is incomplete or not the "
                            f"official archive")
    if sha256 is not None:
        digest = sha256_file(path, progress=progress)
        if not digest.startswith(sha256.lower()):
            raise ChecksumError(f"{path}: SHA-256 {digest}, expected {sha256}; the file is corrupt or not "
                                f"the official archive")


def _transfer(url: str, part: Path, *, size: int | None, progress: bool, timeout: float) -> None:
    """Append the rest of ``url`` to ``part`` (Range request from its current length); one attempt."""
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:  # not a prefix of the file we want
        part.unlink()
        have = 0
    if size is not None and have == size:
        return
    request = urllib.request.Request(url, headers={"User-Agent": "srmap-download"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the part file is complete
            return
        raise
    with response:
        resumed = have and response.status == 206 and \
            response.headers.get("Content-Range", "").startswith(f"bytes {have}-")
        if not resumed:
            have = 0  # the server ignored the Range header: start over
        length = response.headers.get("Content-Length")
        expected = int(length) if length is not None else None
        total = size if size is not None else (have + expected if expected is not None else None)
        received = 0
        with open(part, "ab" if resumed else "wb") as f, \
                tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                     desc=Path(part).name.removesuffix(".part"), disable=not progress) as bar:
            for block in iter(lambda: response.read(_CHUNK), b""):
                f.write(block)
                received += len(block)
                bar.update(len(block))
            f.flush()
            os.fsync(f.fileno())
    if expected is not None and received < expected:
        raise _Incomplete(f"connection closed after {have + received} of {have + expected} bytes")
    if size is not None and have + received < size:
        raise _Incomplete(f"transfer ended after {have + received} of {size} bytes")


def fetch_archive(url: str, dest: Path, *, size: int | None, sha256: str | None, retries: int = 5,
                  backoff: float = 1.0, progress: bool = True, timeout: float = 60) -> Path:
    """Download ``url`` to ``dest`` unless a verified copy is there; returns ``dest``.

    The transfer goes to ``<dest>.part`` and resumes from it (HTTP Range) after
    a dropped connection or a restart. Up to ``retries`` consecutive failed
    attempts that add no bytes are retried, waiting ``backoff * 2**k`` seconds.
    The finished file must match ``size`` and ``sha256`` (None skips a check)
    before it is renamed to ``dest``; on a mismatch the part file is deleted
    and ChecksumError is raised. DownloadError says how to place the file by hand.
    """
    dest = Path(dest)
    if dest.is_file():
        verify_file(dest, size=size, sha256=sha256, progress=progress)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    manual = (f"Download {url} elsewhere and place it at {dest} (it is used once its size and SHA-256 "
              f"match)")
    failures = 0
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            _transfer(url, part, size=size, progress=progress, timeout=timeout)
            break
        except urllib.error.HTTPError as e:
            if e.code < 500 and e.code != 429:  # 404 and friends will not change on a retry
                raise DownloadError(f"{manual}: fetching it failed with HTTP {e.code} {e.reason}.") from None
            error: Exception = e
        except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets, IncompleteRead
            if isinstance(getattr(e, "reason", None), socket.gaierror):  # no DNS: offline, retrying cannot help
                raise DownloadError(f"{manual}: this machine cannot resolve {urllib.parse.urlsplit(url).hostname} "
                                    f"(offline?).") from None
            error = e
        grew = part.exists() and part.stat().st_size > before
        failures = 0 if grew else failures + 1
        if failures > retries:
            raise DownloadError(f"{manual}: {retries + 1} attempts to fetch it made no progress "
                                f"(last: {error}).") from None
        time.sleep(backoff * 2 ** max(failures - 1, 0))
    try:
        verify_file(part, size=size, sha256=sha256, progress=progress)
    except ChecksumError:
        part.unlink()  # a complete but wrong file cannot be resumed into the right one
        raise
    os.replace(part, dest)
    return dest


def _unsafe_member(name: str) -> str | None:
    """Why a zip member name is unsafe to extract (absolute, drive, '..'), or None if it is fine."""
    posix = name.replace("\\", "/")
    if posix.startswith("/"):
        return "absolute path"
    if len(posix) > 1 and posix[1] == ":":
        return "drive letter"
    if ".." in PurePosixPath(posix).parts:
        return "'..' component"
    return None


def extract_pngs(zip_path: Path, out_dir: Path, *, max_pixels: int, names: Collection[str] | None = None,
                 progress: bool = True) -> list[Path]:
    """Extract the PNG members of ``zip_path`` flat into ``out_dir`` (``out_dir/<basename>.png``).

    ``names`` (basenames such as '0001.png') restricts and requires members.
    Refuses archives with absolute, drive-letter or '..' member paths and
    symbolic links; decodes every PNG (pixel limit ``max_pixels``). Extraction
    goes to a temporary folder renamed onto ``out_dir`` at the end, so on any
    error nothing is left behind. Returns the written paths, sorted.
    """
    from srmap.imageio import read_image

    zip_path, out_dir = Path(zip_path), Path(out_dir)
    names = None if names is None else set(names)
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{zip_path}: not a readable zip archive ({e})") from e
    with zf:
        members: dict[str, zipfile.ZipInfo] = {}
        for info in zf.infolist():
            reason = _unsafe_member(info.filename)
            if reason is None and (info.external_attr >> 16) & 0o170000 == 0o120000:
                reason = "symbolic link"
            if reason:
                raise ValueError(f"{zip_path}: unsafe member {info.filename!r} ({reason}); refusing to extract")
            base = PurePosixPath(info.filename.replace("\\", "/")).name
            if info.is_dir() or not base.lower().endswith(".png") or (names is not None and base not in names):
                continue
            if base in members:
                raise ValueError(f"{zip_path}: two members named {base} ({members[base].filename}, {info.filename})")
            members[base] = info
        if names is not None and set(names) - set(members):
            missing = sorted(set(names) - set(members))
            raise ValueError(f"{zip_path}: {len(missing)} expected PNG(s) missing, e.g. {missing[:5]}")
        if not members:
            raise ValueError(f"{zip_path}: no PNG members to extract")
        with atomic_dir(out_dir) as tmp:
            for base, info in tqdm(sorted(members.items()), desc=f"extract {zip_path.name}", unit="png",
                                   disable=not progress):
                if info.file_size > max_pixels * _BYTES_PER_PIXEL + _CHUNK:
                    raise ValueError(f"{zip_path}: member {info.filename} unpacks to {info.file_size} bytes, "
                                     f"more than a {max_pixels}-pixel PNG can hold (max_pixels guard)")
                with zf.open(info) as src, open(tmp / base, "wb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
                try:
                    read_image(tmp / base, max_pixels=max_pixels)
                except ValueError as e:
                    raise ValueError(f"{zip_path}: member {info.filename} is not a usable PNG: {e}") from e
    return sorted(out_dir / base for base in members)


def _split_names(split: str, id_range: Sequence[int] | None) -> list[str]:
    """PNG basenames ('0001.png', ...) of ``split`` for the inclusive ``id_range`` (default: all)."""
    first, last = DIV2K[split]["ids"]
    lo, hi = (first, last) if id_range is None else (int(id_range[0]), int(id_range[1]))
    if not first <= lo <= hi <= last:
        raise ValueError(f"download_div2k: ids[{split!r}]=({lo}, {hi}); expected first <= last within "
                         f"DIV2K {split} ids {first}..{last}")
    return [f"{i:04d}.png" for i in range(lo, hi + 1)]


def download_div2k(out_dir: Path, *, splits: Sequence[str] = ("train", "valid"),
                   ids: dict[str, tuple[int, int]] | None = None, archives_dir: Path | None = None,
                   base_url: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS, retries: int = 5,
                   backoff: float = 1.0, progress: bool = True) -> dict[str, list[Path]]:
    """Fetch, verify and extract the DIV2K HR archives; writes ``out_dir/<split>/<id>.png``.

    ``ids`` maps a split to an inclusive id range (e.g. ``{'train': (1, 800)}``,
    the default being the whole split: train 0001-0800, valid 0801-0900).
    Archives are looked up first in ``$SRMAP_DIV2K_ARCHIVES`` (hand-placed,
    offline) and then in ``archives_dir`` (default: ``$SRMAP_DIV2K_ARCHIVES``
    or ``<out_dir>/../archives``), where missing ones are downloaded; either
    way they must match the size and SHA-256 in ``srmap/div2k.json``.
    ``base_url`` replaces the host folder of the URLs (tests, mirrors);
    ``retries`` and ``backoff`` are passed to :func:`fetch_archive`. Returns ``{split: sorted PNG paths}``.
    """
    out_dir = Path(out_dir)
    unknown = [s for s in splits if s not in DIV2K]
    if unknown:
        raise ValueError(f"download_div2k: unknown split(s) {unknown}; expected {sorted(DIV2K)}")
    env_dir = os.environ.get(ARCHIVES_ENV)
    archives_dir = Path(archives_dir or env_dir or out_dir.parent / "archives")
    result = {}
    for split in splits:
        meta = DIV2K[split]
        names = _split_names(split, (ids or {}).get(split))
        url = f"{base_url.rstrip('/')}/{meta['archive']}" if base_url else meta["url"]
        placed = Path(env_dir) / meta["archive"] if env_dir else None
        target = placed if placed is not None and placed.is_file() else archives_dir / meta["archive"]
        try:
            archive = fetch_archive(url, target, size=meta["size"], sha256=meta["sha256"], retries=retries,
                                    backoff=backoff, progress=progress)
        except DownloadError as e:
            raise DownloadError(f"{meta['archive']} is needed. {e} Or set {ARCHIVES_ENV} to a folder holding "
                                f"it.") from None
        result[split] = extract_pngs(archive, out_dir / split, max_pixels=max_pixels, names=names, progress=progress)
    return result
