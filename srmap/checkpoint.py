"""Checkpoint files: atomic writes, pickle-safe loading, and the generator file saved and loaded side by side.

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
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import nn

from srmap.utils import atomic_path

if TYPE_CHECKING:
    from srmap.nets import Generator

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
    ValueError naming the file, and nothing in it is executed. A truncated,
    empty or foreign file raises ValueError naming it (one line); a missing
    one FileNotFoundError.
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
    except PermissionError as exc:
        raise PermissionError(f"checkpoint {path}: permission denied") from exc
    except (RuntimeError, EOFError, OSError) as exc:  # a truncated zip is OSError EINVAL in torch's reader
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"checkpoint {path} could not be read (truncated or not a torch file?): {reason}") from exc
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



def is_srmap_checkpoint(ckpt: Mapping) -> bool:
    """True for SRMAP's own files: a generator file (key 'format') or a training checkpoint ('gen_config')."""
    return "format" in ckpt or "gen_config" in ckpt


def describe_keys(keys) -> str:
    """'N key(s): a, b, c, ...' for an error line (never the whole list)."""
    keys = sorted(map(str, keys))
    more = ", ..." if len(keys) > 5 else ""
    return f"{len(keys)} key(s): {', '.join(keys[:5])}{more}"


def load_generator(path: str | os.PathLike, device: str = "cpu") -> "Generator":
    """Load a generator for inference from a checkpoint file; returns it in eval mode on ``device``, frozen.

    Accepts a ``srmap-generator/1`` file (keys format, config, state_dict) or
    a training checkpoint such as ``models/<profile>/train_gan/checkpoint.pt``
    (keys gen_config and G; its EMA generator ``G_ema`` is taken when present).
    Reads with ``torch.load(weights_only=True)``, so a crafted pickle never
    runs. Raises FileNotFoundError for a missing file and ValueError naming it
    for a foreign file (one line: the key count and a few keys), weights that
    do not fit the config, or non-finite weights (a diverged run).
    """
    path = Path(path)
    return generator_from_checkpoint(load_checkpoint(path, map_location="cpu"), path, device)


def generator_from_checkpoint(ckpt: Mapping, path: str | os.PathLike, device: str = "cpu") -> "Generator":
    """The generator of an already loaded checkpoint dict (see :func:`load_generator`; ``path`` names it in errors)."""
    from srmap.nets import Generator
    from srmap.options import GeneratorConfig, from_params

    if ckpt.get("format") == GENERATOR_FORMAT:
        cfg, state = ckpt.get("config"), ckpt.get("state_dict")
    elif "gen_config" in ckpt and ("G_ema" in ckpt or "G" in ckpt):
        cfg, state = ckpt["gen_config"], ckpt["G_ema"] if ckpt.get("G_ema") is not None else ckpt["G"]
    elif "format" in ckpt:
        raise ValueError(f"{path}: format is {str(ckpt['format'])[:60]!r}; expected {GENERATOR_FORMAT!r} or a "
                         f"training checkpoint with 'gen_config' and 'G'")
    else:
        raise ValueError(f"{path}: not an SRMAP generator (expected format {GENERATOR_FORMAT!r} or the keys "
                         f"'gen_config' and 'G'); found {describe_keys(ckpt)}")
    if not isinstance(cfg, dict) or not isinstance(state, dict):
        raise ValueError(f"{path}: generator config and weights must both be dicts")
    # A checkpoint saved from a torch.compile'd module prefixes every key.
    if state and all(k.startswith("_orig_mod.") for k in state):
        state = {k[len("_orig_mod."):]: v for k, v in state.items()}
    bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{path}: {len(bad)} weight tensor(s) hold NaN or inf (e.g. {bad[0]!r}); the run that "
                         f"wrote it diverged: use an earlier checkpoint")
    try:
        G = Generator(from_params(GeneratorConfig, cfg, "config"))
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"{path}: unusable generator config ({str(exc).splitlines()[0][:200]})") from exc
    expected = G.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit the stored generator config: {len(missing)} missing "
                         f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}) of "
                         f"{len(state)} keys")
    wrong = [k for k in expected if not torch.is_tensor(state[k]) or state[k].shape != expected[k].shape]
    if wrong:
        k = wrong[0]
        got = tuple(state[k].shape) if torch.is_tensor(state[k]) else type(state[k]).__name__
        raise ValueError(f"{path}: weights do not fit the stored generator config: {len(wrong)} tensor(s) of the "
                         f"wrong shape, e.g. {k!r} is {got}, expected {tuple(expected[k].shape)}")
    G.load_state_dict(state)
    return G.to(device).eval().requires_grad_(False)
