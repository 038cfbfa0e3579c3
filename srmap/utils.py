"""Small shared helpers: atomic file writes, file hashes, project root, device choice, import closure."""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class Interrupted(Exception):
    """The process was asked to stop by a signal (SIGTERM, SIGINT, SIGUSR1); ``exit_code`` = 128 + the signal,
    unless given (training stopped ahead of a SLURM time limit: ``signum`` 0, ``exit_code`` 75).

    The stage scripts and the ``srmap`` command turn it into one line on
    stderr and that exit status; MLflow marks the run KILLED.
    """

    def __init__(self, message: str, signum: int, exit_code: int | None = None):
        super().__init__(message)
        self.signum = int(signum)
        self.exit_code = 128 + self.signum if exit_code is None else int(exit_code)


class DiskFullError(OSError):
    """A write failed because its file system is full (or over quota).

    The message names the file that was being written and the space left;
    :func:`atomic_path` raises it, so the previous version of the file is intact.
    """

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 28]" prefix
        return str(self.strerror)


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is a full-disk write failure: ENOSPC/EDQUOT, or torch.save's
    "PytorchStreamWriter failed writing file" (pytorch/pytorch#76108), which carries no errno."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(exc, RuntimeError) and ("file write failed" in str(exc) or "No space left" in str(exc))


def free_space(folder: str | os.PathLike) -> str:
    """Free space of the file system holding ``folder``, e.g. '12.0 MiB' ('unknown' when it cannot be read)."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if free < 1024 or unit == "GiB":
            return f"{free:.1f} {unit}" if unit != "B" else f"{free} B"
        free /= 1024
    return "unknown"


def umask() -> int:
    """The process's file-mode creation mask (e.g. 0o022), read without changing it where /proc allows."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc: the classic two-call read (not thread-safe, hence the fallback only)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    On any exception the temporary file is removed, so a reader never sees a
    half-written output under the final name (DVC/Snakemake would otherwise
    treat it as a finished, cached result). ``mkstemp`` creates the file with
    mode 0600; before the rename it gets ``0666 & ~umask``, the mode a plain
    ``open(path, "w")`` would give, so group members can read shared outputs.
    A full disk (:func:`is_disk_full`) is re-raised as :class:`DiskFullError`
    naming ``path`` and the free space.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix + ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~umask())
        os.replace(tmp_path, path)
    except BaseException as exc:
        tmp_path.unlink(missing_ok=True)
        if is_disk_full(exc) and not isinstance(exc, DiskFullError):
            raise DiskFullError(errno.ENOSPC, f"could not write {path}: no space left on device "
                                f"({free_space(path.parent)} free in {path.parent}); the previous "
                                f"{path.name}, if any, is intact") from exc
        raise


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Temporary files :func:`atomic_path` made for ``path`` that were never renamed into place (a killed run's)."""
    path = Path(path)
    return sorted(path.parent.glob(f".{glob.escape(path.name)}.*{glob.escape(path.suffix)}.tmp"))


@contextlib.contextmanager
def signals_raise_interrupted(signums) -> Iterator[None]:
    """Within the block, each of ``signums`` raises :class:`Interrupted` (so ``finally`` and :func:`atomic_path`
    clean up); the previous handlers come back on exit. A no-op outside the main thread, which alone may set them."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Interrupted(f"stopped by {signal.Signals(signum).name}", signum)

    old = {num: signal.signal(num, stop) for num in signums}
    try:
        yield
    finally:
        for num, handler in old.items():
            signal.signal(num, handler)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_metadata(default: str | os.PathLike, env: str) -> dict[str, Any]:
    """The JSON object of a package metadata file (``srmap/div2k.json``, ``srmap/baselines.json``), or of the
    file named by the environment variable ``env`` when it is set.

    The override is for mirrors and for the paper-path rehearsal
    (scripts/rehearse_paper.py), whose stand-in archives and fabricated weights
    have their own URLs, sizes and SHA-256. DVC does not track it, so using one
    is announced on stderr. Raises ValueError naming the file when it cannot be
    read or does not hold a JSON object.
    """
    import sys

    path = Path(os.environ.get(env) or default)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read metadata ({exc}); expected a JSON object"
                         + (f" (set by ${env})" if os.environ.get(env) else "")) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
    if os.environ.get(env):
        print(f"srmap: ${env}: using {path} instead of {Path(default).name} (checksums and URLs not tracked by DVC)",
              file=sys.stderr)
    return data


def project_root() -> Path:
    """The repository root (the folder that holds ``params.yaml``), found from this file."""
    return Path(__file__).resolve().parents[1]


def import_closure(script: str | os.PathLike) -> list[Path]:
    """The ``srmap/*.py`` modules that ``script`` imports, directly or through each other, sorted.

    Static: every ``import srmap.x`` / ``from srmap(.x) import y`` anywhere in the
    AST counts, lazy imports inside functions included. ``script`` itself is not
    in the result unless something imports it. Paths are absolute files of this
    package. This is the code a pipeline stage depends on (dvc.yaml and the
    Snakefile declare exactly these) and what training fingerprints.
    """
    import ast

    pkg = Path(__file__).resolve().parent

    def direct(path: Path) -> set[Path]:
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        parts = (n.split(".") for n in names)
        files = (pkg / f"{p[1]}.py" for p in parts if len(p) == 2 and p[0] == pkg.name)
        return {f for f in files if f.is_file()}

    seen: set[Path] = set()
    todo = [Path(script).resolve()]
    while todo:
        for dep in direct(todo.pop()) - seen:
            seen.add(dep)
            todo.append(dep)
    return sorted(seen)


def pick_device(requested: str | None = None) -> str:
    """Return ``requested`` or 'cuda' when available, else 'cpu'."""
    if requested:
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``path``; on success it replaces ``path``.

    A stage that fails half-way leaves no folder under the final name, so a
    workflow engine can never mistake partial output for a finished result. An
    existing folder at ``path`` is first renamed aside, so ``path`` is only
    missing between two renames, never half-deleted. Before the rename the
    folder gets ``0777 & ~umask``, as ``mkdir`` would give. On an exception the
    temporary folder is removed.
    """
    import shutil
    import uuid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~umask())
        if path.exists():
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | os.PathLike, *, progress: bool = False) -> str:
    """Hex SHA-256 digest (64 lowercase hex chars) of the file at ``path``, read in 1 MiB chunks.

    ``progress`` shows a tqdm bar in bytes. Raises OSError if the file cannot be read.
    """
    import hashlib

    from tqdm import tqdm

    digest = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=os.path.getsize(path), unit="B", unit_scale=True, unit_divisor=1024,
                                     desc=f"sha256 {Path(path).name}", disable=not progress) as bar:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()
