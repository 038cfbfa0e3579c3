"""Resume state of a training stage: the checkpoint's format, RNG states, fingerprints, and the resume decision.

A stage resumes from ``out_dir/checkpoint.pt`` when that checkpoint continues
the run being asked for: same stage, same guarded config (training options,
model configs, a fingerprint of the training data, the initial generator's
SHA-256), not past the run's last step, and not a finished run re-run with
unchanged code. Otherwise the checkpoint is **set aside** (renamed to
``checkpoint.step<N>.<reason>.pt`` next to it, never deleted or overwritten) and
the stage trains from scratch. A change of code alone is not a reason: the run
resumes, and the change is recorded (docs/training.md, "What happens to a
checkpoint").
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from srmap.checkpoint import load_checkpoint
from srmap.utils import import_closure

CHECKPOINT_FORMAT = "srmap-train/1"
# Keys that may change between a checkpoint and a resumed run: they change when
# or how often things happen, not what a given step computes. Input paths are
# free too because their contents are guarded by fingerprints instead; the code
# fingerprint is recorded, not guarded.
RESUME_FREE_KEYS = frozenset({"epochs", "milestones", "log_every", "ckpt_every", "image_every", "workers",
                              "data_dir", "init_generator", "code_sha256", "code_history"})
# Why a checkpoint was set aside: the <reason> in its new name.
REASONS = {
    "foreign": "not a checkpoint of this stage",
    "past-end": "past this run's last step",
    "config-changed": "written with a different config",
    "rerun": "a finished run, re-run with unchanged code (forced, or its outputs were removed)",
}


def plain(v: Any) -> Any:
    """JSON-like copy: tuples become lists, paths strings, dataclasses dicts."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return plain(dataclasses.asdict(v))
    if isinstance(v, Mapping):
        return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


# ---------------------------------------------------------------------------
# Fingerprints
# ---------------------------------------------------------------------------


def data_fingerprint(data_dir: Path) -> str:
    """A cheap content fingerprint of a prepared training folder (hr/*.npy, lr/*.npy, manifest.json): hex SHA-256.

    Hashes every file's relative path and size, all of every LR file and of
    the manifest, and the first 64 KiB of every HR file (the LR is derived from
    the HR, so a changed HR image shows in its LR). Reads about 1/16 of the
    data. Raises FileNotFoundError when the folder holds no training images.
    """
    h = hashlib.sha256()
    files = sorted(p for sub in ("hr", "lr") for p in (data_dir / sub).glob("*.npy"))
    if not files:
        raise FileNotFoundError(f"{data_dir}: no hr/*.npy or lr/*.npy training images (run the degrade stage first)")
    manifest = data_dir / "manifest.json"  # decides which images PatchDataset uses
    for p in files + ([manifest] if manifest.is_file() else []):
        rel = p.relative_to(data_dir).as_posix()
        h.update(f"{rel}\0{p.stat().st_size}\0".encode())
        with open(p, "rb") as f:
            h.update(f.read(1 << 16) if rel.startswith("hr/") else f.read())
    return h.hexdigest()


def code_fingerprint() -> str:
    """Hex SHA-256 over the source of ``srmap/train.py`` and every ``srmap`` module it imports (its import closure).

    The training stages declare these same files as DVC/Snakemake deps
    (tests/test_workflow.py). Recorded in the checkpoint and in
    training_options.json, so a resumed run says which code wrote each part.
    """
    h = hashlib.sha256()
    train = Path(__file__).resolve().with_name("train.py")
    for path in sorted({train, *import_closure(train)}):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Keys whose values differ between two resolved configs, ignoring :data:`RESUME_FREE_KEYS`; sorted."""
    keys = (set(old) | set(new)) - RESUME_FREE_KEYS
    return sorted(k for k in keys if old.get(k) != new.get(k))


# ---------------------------------------------------------------------------
# RNG state
# ---------------------------------------------------------------------------


def rng_state(device: torch.device) -> dict:
    """Every RNG state of this process as tensors / plain values (loadable with weights_only=True).

    Training draws nothing from these after initialisation (patches and noise
    are pure functions of their index), but they are kept so that any code
    that does resumes exactly.
    """
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    """Restore the states captured by :func:`rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


# ---------------------------------------------------------------------------
# The decision
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ResumeDecision:
    """What a stage does with the checkpoint it found."""

    ckpt: dict | None  # the checkpoint to resume from; None = train from scratch
    set_aside: Path | None  # where a checkpoint that is not resumed was moved, else None
    reason: str | None  # key of REASONS when set aside
    code_changed: bool  # resuming a checkpoint written by other code (recorded, not refused)


def set_aside(path: Path, step: int, reason: str) -> Path:
    """Rename ``path`` to ``checkpoint.step<step>.<reason>.pt`` beside it (``.1``, ``.2``, ... if taken); returns
    the new path. Nothing is copied or deleted: the rename is atomic on one filesystem."""
    base = f"{path.stem}.step{step}.{reason}"
    target, n = path.with_name(f"{base}.pt"), 0
    while target.exists():
        n += 1
        target = path.with_name(f"{base}.{n}.pt")
    os.replace(path, target)
    return target


def decide(ckpt_path: Path, *, stage: str, resolved: Mapping[str, Any], total: int, main: bool) -> ResumeDecision:
    """Read ``ckpt_path`` (if any) and decide: resume it, or set it aside and start from scratch.

    ``resolved`` is the run's guarded config (with ``code_sha256``), ``total``
    its number of steps. Only the main process (``main``) renames files and
    warns; every process returns the same decision. A checkpoint that cannot
    be read raises ValueError naming it (it is left in place: a damaged file
    is the user's to inspect, not ours to move).
    """
    if not ckpt_path.is_file():
        return ResumeDecision(None, None, None, False)
    ckpt = load_checkpoint(ckpt_path)
    step = int(ckpt.get("step", 0)) if isinstance(ckpt.get("step", 0), int) else 0
    reason, detail = None, ""
    if ckpt.get("format") != CHECKPOINT_FORMAT or ckpt.get("stage") != stage:
        reason, detail = "foreign", f"format {ckpt.get('format')!r}, stage {ckpt.get('stage')!r}"
    elif step > total:
        reason, detail = "past-end", f"step {step} > {total} (epochs x iters_per_epoch)"
    else:
        diff = config_diff(ckpt["config"], resolved)
        same_code = ckpt["config"].get("code_sha256") == resolved.get("code_sha256")
        if diff:
            reason, detail = "config-changed", f"differs in: {', '.join(diff)}"
        elif ckpt.get("finished") and step == total and same_code:
            reason, detail = "rerun", f"{total} steps"
        else:
            return ResumeDecision(ckpt, None, None, not same_code)
    moved = ckpt_path
    if main:
        moved = set_aside(ckpt_path, step, reason)
        warnings.warn(f"{ckpt_path} is {REASONS[reason]} ({detail}): NOT resuming; kept it as {moved} and "
                      f"training {stage} from scratch", RuntimeWarning, stacklevel=2)
    return ResumeDecision(None, moved, reason, False)
