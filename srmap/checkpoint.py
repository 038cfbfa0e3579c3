"""Checkpoint files: atomic writes and pickle-safe loading.

Every file is written to a temporary name in the same folder, fsynced and
renamed over the old one, so a process killed mid-write (SIGKILL, OOM, a
preempted cluster job) leaves the previous file intact. Every file is read
with ``torch.load(weights_only=True)``, which only rebuilds tensors and plain
Python containers: a crafted pickle cannot run code. Anything stored here
must therefore be tensors, numbers, strings, None, lists, tuples or dicts.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from srmap.utils import atomic_path

GENERATOR_FORMAT = "srmap-generator/1"


def _fsync_dir(folder: Path) -> None:
    # The rename itself lives in the directory entry; without this a power
    # loss right after os.replace could still lose the new name on some
    # filesystems. Not every platform can open a directory, hence the guard.
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Write ``state`` (tensors and plain Python values) to ``path`` atomically.

    The data goes to a temporary file next to ``path``, is fsynced, and is
    renamed onto ``path``; a reader sees either the old or the new file.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
    _fsync_dir(path.parent)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` or :func:`save_generator`.

    Uses ``torch.load(weights_only=True)``; a file that needs arbitrary
    unpickling (e.g. a crafted ``__reduce__`` payload) is refused with a
    ValueError naming the file, and nothing in it is executed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message is a paragraph; the line naming the refused global is the useful one.
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        first = next((ln for ln in lines if "Unsupported" in ln or "WeightsUnpickler" in ln),
                     lines[0] if lines else type(exc).__name__)
        raise ValueError(f"checkpoint {path} holds objects that torch.load(weights_only=True) refuses "
                         f"to rebuild (not an SRMAP checkpoint, or a tampered one): {first}") from exc
    except (RuntimeError, EOFError) as exc:
        raise ValueError(f"checkpoint {path} could not be read (truncated or not a torch file?): {exc}") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {path} holds a {type(obj).__name__}; expected a dict")
    return obj


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def save_generator(path: str | os.PathLike, G: nn.Module, gen_cfg: Any, meta: Mapping[str, Any]) -> None:
    """Save a generator for inference, atomically, in the ``srmap-generator/1`` format.

    Takes the generator (possibly wrapped in DDP / torch.compile), its
    GeneratorConfig dataclass and a dict of plain metadata. Writes
    ``{"format", "config": asdict(gen_cfg), "state_dict" (CPU tensors), "meta"}``.
    """
    state = {k: v.detach().to("cpu", copy=True) for k, v in unwrap(G).state_dict().items()}
    save_checkpoint(path, {"format": GENERATOR_FORMAT, "config": dataclasses.asdict(gen_cfg),
                           "state_dict": state, "meta": dict(meta)})

