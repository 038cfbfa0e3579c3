"""Training: L1 pretraining of the generator, then MAP-GAN training (report, Method).

One explicit loop per stage (:func:`pretrain`, :func:`train_gan`), each taking
its options record (:class:`~srmap.options.PretrainOptions` /
:class:`~srmap.options.GanOptions`: the ``pretrain`` / ``train_gan`` sections of
params.yaml). Resume, checkpoints and logging are written once, in
:class:`_Tail`; the step bodies stay in the loops. Both stages

* resume automatically from ``out_dir/checkpoint.pt`` (models, optimisers,
  schedulers, AMP scaler, step, every RNG state of every rank), bit-exactly on
  CPU, unless the stored config differs in a key that changes the result;
* draw batch ``b`` from dataset indices ``[b*B, (b+1)*B)`` of a
  :class:`~srmap.data.PatchDataset` whose items are pure functions of
  ``(seed, index)``, so the data order after a resume needs only the step;
* skip any step whose loss or gradient is not finite and stop with
  :class:`NonFiniteLossError` after ``max_bad_steps`` consecutive skips;
* run under ``torchrun`` as DistributedDataParallel (nccl on CUDA, gloo on CPU),
  each rank taking its slice of every global batch; rank 0 alone writes files;
* use bf16 autocast, channels_last and torch.compile only on CUDA.

docs/training.md explains the outputs, resume rules and our choices.
"""

from __future__ import annotations

import atexit
import bisect
import csv
import dataclasses
import hashlib
import io
import math
import os
import random
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler

from srmap.checkpoint import load_checkpoint, save_checkpoint, save_generator
from srmap.losses import critic_adv_loss, fidelity_loss, generator_adv_loss, l1_loss, r1_penalty
from srmap.options import GanOptions, PretrainOptions
from srmap.utils import atomic_path, atomic_write_json, atomic_write_text, import_closure, sha256_file

CHECKPOINT_FORMAT = "srmap-train/1"
# Mean |noise scale| of each injector group (srmap.nets.Generator.injector_groups), logged at every log step.
NOISE_COLUMNS = ("noise_stem", "noise_trunk", "noise_features", "noise_up_x2", "noise_up_x4")
PRETRAIN_COLUMNS = ("step", "epoch", "l1", "lr", "skipped") + NOISE_COLUMNS
GAN_COLUMNS = ("step", "epoch", "fidelity", "generator", "critic", "r1", "lr_g", "lr_d", "skipped") + NOISE_COLUMNS
# LR pixels at each patch border left out of the fidelity term: the bicubic x1/4
# kernel (support 16 HR px) of the outer two LR pixels reaches past the HR patch,
# where downscaling the patch mirrors but the LR was cut from the whole image.
FIDELITY_BORDER = 2
# Keys that may change between a checkpoint and a resumed run: they change when
# or how often things happen, not what a given step computes. Input paths are
# free too because their contents are guarded by fingerprints instead.
RESUME_FREE_KEYS = frozenset({"epochs", "milestones", "log_every", "ckpt_every", "image_every", "workers",
                              "data_dir", "init_generator"})
SCALE = 4
MONITOR_SAMPLES = 4  # columns of a monitoring grid


class NonFiniteLossError(RuntimeError):
    """Raised when training produced ``max_bad_steps`` consecutive non-finite steps."""


# ---------------------------------------------------------------------------
# Process group and device
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a (possibly single-process) run."""

    rank: int  # global rank, 0 when not distributed
    world: int  # number of processes
    local_rank: int  # rank on this node; picks the CUDA device

    @property
    def main(self) -> bool:
        """True on the process that writes files and logs."""
        return self.rank == 0


def _destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _setup_distributed(device: str | None) -> tuple[DistInfo, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1 (or reuse the caller's); pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 or (dist.is_available() and dist.is_initialized()):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        want_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        dev = torch.device("cuda", local) if want_cuda else torch.device("cpu")
        if want_cuda:
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if want_cuda else "gloo", device_id=dev if want_cuda else None)
            # One group per process, destroyed at exit: torch cannot re-create the
            # default group after destroying it (pytorch/pytorch#55967), and a
            # caller may run both stages in one process.
            atexit.register(_destroy_group)
        return DistInfo(dist.get_rank(), dist.get_world_size(), local), dev
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)
    return DistInfo(0, 1, 0), dev


def _finish(info: DistInfo) -> None:
    """Let every rank return only once rank 0 has written the stage's outputs."""
    if info.world > 1:
        dist.barrier()


def _wrap_ddp(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    if info.world == 1:
        return model
    # forward_sync_buffers=False: the only buffers are constant filter taps, and a
    # per-forward broadcast would add a collective to every critic call.
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                               forward_sync_buffers=False, gradient_as_bucket_view=True)


def _all_mean(values: Sequence[Tensor], info: DistInfo) -> list[float]:
    """Mean over ranks of scalar tensors, returned as floats (one collective, one host sync)."""
    t = torch.stack([v.detach().float().reshape(()) for v in values])
    if info.world > 1:
        dist.all_reduce(t)
        t /= info.world
    return t.tolist()


# ---------------------------------------------------------------------------
# Data order
# ---------------------------------------------------------------------------


class StepBatchSampler(Sampler):
    """Yields, for steps ``start_step .. total_steps-1``, this rank's dataset indices of that step.

    Global batch ``b`` is indices ``[b*B, (b+1)*B)``. It is cut into ``groups``
    equal contiguous parts (1 for pretraining; 2 for the GAN: LR half, HR half)
    and rank ``r`` of ``world`` takes the r-th slice of every part, so the
    union over ranks is the single-process batch, in the same pairing.
    """

    def __init__(self, *, start_step: int, total_steps: int, batch_size: int, rank: int = 0, world: int = 1,
                 groups: int = 1):
        if batch_size % (groups * world):
            raise ValueError(f"batch_size {batch_size} must be divisible by {groups * world} "
                             f"({groups} part(s) x {world} process(es))")
        self.start, self.total, self.batch = start_step, total_steps, batch_size
        self.rank, self.world, self.groups = rank, world, groups

    def indices(self, step: int) -> list[int]:
        """This rank's dataset indices for global step ``step`` (0-based)."""
        part = self.batch // self.groups
        local = part // self.world
        out: list[int] = []
        for g in range(self.groups):
            lo = step * self.batch + g * part + self.rank * local
            out.extend(range(lo, lo + local))
        return out

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.total):
            yield self.indices(step)

    def __len__(self) -> int:
        return max(self.total - self.start, 0)


def _loader(data_dir: Path, *, lr_patch: int, seed: int, total_steps: int, batch_size: int, start_step: int,
            end_step: int, info: DistInfo, groups: int, workers: int, device: torch.device) -> DataLoader:
    """Batches of steps [start_step, end_step) of a run of ``total_steps`` (uint8 LR, HR pairs)."""
    from srmap.data import PatchDataset

    dataset = PatchDataset(data_dir, lr_patch=lr_patch, scale=SCALE, length=total_steps * batch_size, seed=seed)
    sampler = StepBatchSampler(start_step=start_step, total_steps=min(end_step, total_steps), batch_size=batch_size,
                               rank=info.rank, world=info.world, groups=groups)
    # A private generator: creating the iterator would otherwise draw from the
    # global RNG and shift the noise stream of a resumed run by one draw.
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda",
                      generator=torch.Generator().manual_seed(seed))


def _to_float(batch: Tensor, device: torch.device, channels_last: bool) -> Tensor:
    """uint8 (N,3,H,W) -> float32 in [0,1] on ``device``."""
    x = batch.to(device, non_blocking=True).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# ---------------------------------------------------------------------------
# Learning-rate schedule, RNG state
# ---------------------------------------------------------------------------


def lr_factor(step: int, milestone_steps: Sequence[int], gamma: float) -> float:
    """Multiplier of the base learning rate at 0-based ``step``: gamma ** (milestones passed)."""
    return gamma ** bisect.bisect_right(sorted(milestone_steps), step)


def _scheduler(opt: torch.optim.Optimizer, milestones: Sequence[int], iters_per_epoch: int,
               gamma: float) -> torch.optim.lr_scheduler.LambdaLR:
    # A closed form of the step, not MultiStepLR's running product, so a resume
    # with new milestones (e.g. more epochs) applies them correctly; LambdaLR
    # stores no lambda in its state_dict, so the current milestones win.
    steps = [int(m) * iters_per_epoch for m in milestones]
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, gamma))


def _sync_lr(sched: torch.optim.lr_scheduler.LambdaLR) -> None:
    # The optimiser's state_dict carries the lr of the checkpointed schedule;
    # recompute it from the current one.
    for group, base, fn in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base * fn(sched.last_epoch)


def rng_state(device: torch.device) -> dict:
    """Every RNG state of this process as tensors / plain values (loadable with weights_only=True)."""
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


def _seed_all(seed: int, rank: int = 0) -> None:
    # Ranks get distinct streams so their noise injections differ.
    s = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def _gather_rng(device: torch.device, info: DistInfo) -> list[dict]:
    state = rng_state(device)
    if info.world == 1:
        return [state]
    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, state)
    return out


# ---------------------------------------------------------------------------
# Resolved config and the resume guard
# ---------------------------------------------------------------------------


def _plain(v: Any) -> Any:
    """JSON-like copy: tuples become lists, paths strings, dataclasses dicts."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return _plain(dataclasses.asdict(v))
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


def data_fingerprint(data_dir: Path) -> str:
    """A cheap content fingerprint of a prepared training folder (hr/*.npy, lr/*.npy, manifest.json).

    Hashes every file's relative path and size, all of every LR file and of
    the manifest, and the first 64 KiB of every HR file (the LR is derived from
    the HR, so a changed HR image shows in its LR). Reads about 1/16 of the
    data; returns a hex digest.
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
    """SHA-256 over the source of this module and every ``srmap`` module it imports (its import closure).

    Part of the resume guard: when DVC re-runs a stage because this code changed,
    a finished checkpoint from the old code must not be "resumed" into a result.
    The training stages declare these same files as deps (tests/test_workflow.py).
    """
    h = hashlib.sha256()
    here = Path(__file__).resolve()
    for path in sorted({here, *import_closure(here)}):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Keys whose values differ between two resolved configs, ignoring :data:`RESUME_FREE_KEYS`."""
    keys = (set(old) | set(new)) - RESUME_FREE_KEYS
    return sorted(k for k in keys if old.get(k) != new.get(k))


def _gen_config(gen_cfg: Any):
    from srmap.nets import GeneratorConfig, generator_config

    return gen_cfg if isinstance(gen_cfg, GeneratorConfig) else generator_config(gen_cfg)


def _critic_config(critic_cfg: Any):
    from srmap.nets import CriticConfig, critic_config

    return critic_cfg if isinstance(critic_cfg, CriticConfig) else critic_config(critic_cfg)


# ---------------------------------------------------------------------------
# Logging: CSV, window means, progress
# ---------------------------------------------------------------------------


class LossLog:
    """losses.csv kept in memory and rewritten atomically at every row, so it is always a valid CSV.

    The rows also travel in the checkpoint: DVC deletes a stage's non-persistent
    outputs before re-running it, and a resumed run must still report the
    whole history (and never a row twice).
    """

    def __init__(self, path: Path, columns: Sequence[str], rows: Sequence[Mapping[str, str]], enabled: bool):
        self.path, self.columns, self.enabled = path, tuple(columns), enabled
        self.rows: list[dict[str, str]] = [dict(r) for r in rows]
        if enabled:
            self._write()

    def append(self, row: Mapping[str, Any]) -> None:
        """Add one row (floats written with 6 significant digits) and rewrite the file."""
        self.rows.append({c: (f"{row[c]:.6g}" if isinstance(row[c], float) else str(row[c])) for c in self.columns})
        if self.enabled:
            self._write()

    def _write(self) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.columns, lineterminator="\n")
        w.writeheader()
        w.writerows(self.rows)
        atomic_write_text(self.path, buf.getvalue())


class WindowMeter:
    """Means of the finite steps since the last log row, plus the count of skipped ones.

    Its state goes into checkpoints, so a resumed run logs the same rows as an
    uninterrupted one.
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0
        self.skipped = 0
        self.steps = 0
        self.t0 = time.perf_counter()

    def add(self, values: Mapping[str, float], skipped: bool) -> None:
        """Record one step; a skipped step's (non-finite) values are left out of the means."""
        self.steps += 1
        for k in values:
            self.sums.setdefault(k, 0.0)
        if skipped:
            self.skipped += 1
            return
        self.count += 1
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def means(self) -> dict[str, float]:
        """Mean per key over the window's finite steps (NaN when every step was skipped)."""
        return {k: (v / self.count if self.count else math.nan) for k, v in self.sums.items()}

    def seconds_per_step(self) -> float:
        """Wall time per step since the window opened."""
        return (time.perf_counter() - self.t0) / max(self.steps, 1)

    def reset(self) -> None:
        """Open a new window."""
        self.__init__()

    def state_dict(self) -> dict:
        """Plain-value state (timing excluded)."""
        return {"sums": dict(self.sums), "count": self.count, "skipped": self.skipped, "steps": self.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.sums, self.count = dict(state["sums"]), int(state["count"])
        self.skipped, self.steps = int(state["skipped"]), int(state["steps"])


class Progress:
    """A tqdm bar on a terminal; otherwise one line per log row (cluster logs stay readable)."""

    def __init__(self, desc: str, total: int, start: int, enabled: bool):
        from tqdm.auto import tqdm

        self.desc, self.total, self.start, self.enabled = desc, total, start, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True, disable=not self.tty)
        self.t0 = time.perf_counter()

    def step(self) -> None:
        """Advance by one step."""
        self.bar.update(1)

    def report(self, step: int, epoch: int, values: Mapping[str, float]) -> None:
        """Show the window's losses (bar postfix, or a printed line when not a terminal)."""
        if not self.enabled:
            return
        shown = {k: f"{v:.4g}" for k, v in values.items()}
        if self.tty:
            self.bar.set_postfix(epoch=epoch, **shown)
            return
        done = step - self.start
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else math.inf
        eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) and eta < 86400 * 365 else "?"
        vals = " ".join(f"{k} {v}" for k, v in shown.items())
        print(f"[{self.desc}] step {step}/{self.total} epoch {epoch} | {vals} | {rate:.2f} step/s | ETA {eta_s}",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        """Close the bar."""
        self.bar.close()


# ---------------------------------------------------------------------------
# Shared step machinery
# ---------------------------------------------------------------------------


class BadStepCounter:
    """Counts skipped (non-finite) steps; raises NonFiniteLossError after ``limit`` in a row."""

    def __init__(self, limit: int, stage: str, ckpt_path: Path, total: int = 0):
        self.limit, self.stage, self.ckpt_path = limit, stage, ckpt_path
        self.consecutive, self.total = 0, total

    def update(self, bad: bool, step: int) -> None:
        """Record whether 1-based ``step`` was skipped."""
        if not bad:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        warnings.warn(f"{self.stage}: non-finite loss or gradient at step {step}; update skipped "
                      f"({self.consecutive}/{self.limit} in a row)", RuntimeWarning, stacklevel=3)
        if self.consecutive >= self.limit:
            raise NonFiniteLossError(
                f"{self.stage}: {self.consecutive} consecutive steps with non-finite loss or gradient "
                f"(max_bad_steps={self.limit}) ending at step {step}; the last good checkpoint "
                f"{self.ckpt_path} is intact (lower the learning rate or set amp: false, then re-run)")


def _grad_norm(params: Sequence[nn.Parameter]) -> Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0)


def _finite_flag(*tensors: Tensor) -> Tensor:
    """1.0 when any of the scalar tensors is NaN/inf, else 0.0 (stays on device, no sync)."""
    bad = torch.zeros((), dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        bad = bad | ~torch.isfinite(t.detach().float().to(bad.device))
    return bad.float()


def _weights_finite(*models: nn.Module) -> bool:
    flags = [torch.isfinite(p).all() for m in models for p in m.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


def _autocast(device: torch.device, amp: bool):
    # bf16 needs no loss scaling; fp16 is not offered. CPU runs without autocast
    # so CPU results (and the bit-exact resume tests) stay in float32.
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _prepare(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _requires_grad(model: nn.Module, flag: bool) -> None:
    for p in model.parameters():
        p.requires_grad_(flag)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, beta: float) -> None:
    """ema <- beta * ema + (1 - beta) * model, for every parameter; buffers are copied (authors' trainer).

    Both modules must have the same structure; updated in place, every step.
    """
    ema_p, p = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(ema_p, [x.detach() for x in p], 1.0 - beta)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def noise_rngs(seed: int, indices: Sequence[int], device: torch.device) -> list[torch.Generator]:
    """One torch.Generator per training sample, seeded by (run seed, dataset index).

    The training noise of a sample is thus a function of the sample alone: the
    same under any number of processes, and after a resume.
    """
    out = []
    for i in indices:
        s = int(np.random.SeedSequence([seed, int(i)]).generate_state(2, np.uint32).astype(np.uint64) @ [1, 1 << 32])
        out.append(torch.Generator(device=device).manual_seed(s))
    return out


def _noise_row(G: nn.Module) -> dict[str, float]:
    """Mean |noise scale| per injector group, keyed by the NOISE_COLUMNS names."""
    return {f"noise_{k}": v for k, v in G.noise_scale_means().items()}


@dataclass
class _Setup:
    """What both loops share after setup."""

    info: DistInfo
    device: torch.device
    cuda: bool  # autocast / channels_last / compile may apply
    channels_last: bool
    total: int  # total steps
    ckpt_path: Path
    out_dir: Path
    resolved: dict  # the guarded config
    ckpt: dict | None  # checkpoint to resume from (None = fresh start)


def _begin(stage: str, out_dir: Any, resolved: dict, *, seed: int, channels_last: bool,
           device: str | None, total: int) -> _Setup:
    """Join the process group, seed, decide fresh start vs resume, write training_options.json."""
    info, dev = _setup_distributed(device)
    out = Path(out_dir).resolve()
    ckpt_path = out / "checkpoint.pt"
    ckpt = None
    if ckpt_path.is_file():
        ckpt = load_checkpoint(ckpt_path)
        if ckpt.get("format") != CHECKPOINT_FORMAT or ckpt.get("stage") != stage:
            _warn(info, f"{ckpt_path} is not a {stage} checkpoint (format {ckpt.get('format')!r}, stage "
                        f"{ckpt.get('stage')!r}); starting from scratch")
            ckpt = None
        elif int(ckpt["step"]) > total:
            _warn(info, f"{ckpt_path} is at step {ckpt['step']}, past this run's {total} steps "
                        f"(epochs x iters_per_epoch); NOT resuming, training {stage} from scratch")
            ckpt = None
        else:
            diff = config_diff(ckpt["config"], resolved)
            if diff:
                _warn(info, f"{ckpt_path} was written with a different config (differs in: {', '.join(diff)}); "
                            f"NOT resuming, training {stage} from scratch")
                ckpt = None
            elif ckpt.get("finished") and int(ckpt["step"]) == total:
                # DVC/Snakemake re-run a finished stage only when forced (`dvc repro -f`), when an output is
                # missing or when a dependency outside the resume guard changed: its outputs must be made anew.
                _warn(info, f"{ckpt_path} is a finished run ({total} steps) and the stage was run again "
                            f"(forced, or its outputs were removed): training {stage} from scratch")
                ckpt = None
    _seed_all(seed)  # model initialisation is identical on every rank
    if dev.type == "cuda":
        # Fixed patch shapes: let cuDNN pick the fastest kernels once.
        torch.backends.cudnn.benchmark = True
    if info.main:
        out.mkdir(parents=True, exist_ok=True)
        # Temporary files of writes that a killed run never renamed into place.
        for stale in out.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
        atomic_write_json(out / "training_options.json", {
            "stage": stage, "config": resolved, "world_size": info.world, "device": str(dev),
            "torch": str(torch.__version__), "resumed_from_step": int(ckpt["step"]) if ckpt else None})
    cuda = dev.type == "cuda"
    return _Setup(info, dev, cuda, channels_last and cuda, total, ckpt_path, out, resolved, ckpt)


def _warn(info: DistInfo, msg: str) -> None:
    if info.main:
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _restore_rng(s: _Setup, seed: int) -> None:
    """After model construction: restore every rank's RNG from the checkpoint, or seed the training stream."""
    if s.ckpt is None:
        _seed_all(seed, s.info.rank + 1)
        return
    states = s.ckpt["rng"]
    if len(states) == s.info.world:
        set_rng_state(states[s.info.rank], s.device)
    else:
        _warn(s.info, f"{s.ckpt_path} was written by {len(states)} process(es), this run has {s.info.world}: "
                      f"resuming with re-seeded noise (results will differ from an uninterrupted run)")
        _seed_all(seed + int(s.ckpt["step"]), s.info.rank + 1)


def _clear_monitor(folder: Path, after_step: int) -> None:
    # Grids from a discarded or interrupted run would otherwise mix with new ones.
    if not folder.is_dir():
        return
    for p in folder.glob("step_*.png"):
        try:
            n = int(p.stem.split("_")[1])
        except (IndexError, ValueError):
            continue
        if n > after_step:
            p.unlink()


def _save_monitor(path: Path, y: Tensor, sr: Tensor, hr: Tensor) -> None:
    """Grid of up to MONITOR_SAMPLES columns: rows LR (nearest x4), SR, HR; floats in [0,1] NCHW."""
    from torchvision.utils import make_grid

    k = min(MONITOR_SAMPLES, y.shape[0])
    up = torch.nn.functional.interpolate(y[:k].float(), scale_factor=SCALE, mode="nearest")
    rows = torch.cat([up, sr[:k].float().clamp(0, 1), hr[:k].float()]).cpu()
    grid = make_grid(rows, nrow=k, padding=2, pad_value=1.0)
    img = grid.mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(img).save(tmp, format="PNG")


def _epoch_of(step: int, iters_per_epoch: int) -> int:
    """1-based epoch of 1-based ``step``."""
    return (step - 1) // iters_per_epoch + 1


# ---------------------------------------------------------------------------
# The shared tail: resume, checkpoint, logging, the end of a stage
# ---------------------------------------------------------------------------


class _Tail:
    """Everything around a step, written once for both stages (NVlabs/edm ``training_loop.py``).

    A loop builds its networks, optimisers and schedulers and hands them here
    by name (``"G"``, ``"G_ema"``, ``"D"``). The constructor restores them,
    the AMP scaler, the log window and every rank's RNG from ``s.ckpt`` (or
    seeds the training stream for a fresh start); :meth:`step_done` keeps the
    window means, the NaN guard, losses.csv, MLflow, the progress display and
    the checkpoints; :meth:`finish` writes generator.pt. The step bodies stay in
    the loops. Every MLflow call of training is in :meth:`track_metrics` and
    :meth:`track_artifact` (rank 0 only).
    """

    def __init__(self, s: _Setup, stage: str, opts: PretrainOptions | GanOptions, *, nets: Mapping[str, nn.Module],
                 optimizers: Mapping[str, torch.optim.Optimizer],
                 schedulers: Mapping[str, torch.optim.lr_scheduler.LambdaLR], scaler: torch.amp.GradScaler,
                 configs: Mapping[str, Any], columns: Sequence[str], shown: Sequence[str], tracker,
                 stop_after: int | None):
        self.s, self.stage, self.opts, self.tracker, self.stop_after = s, stage, opts, tracker, stop_after
        self.nets, self.optimizers, self.schedulers, self.scaler = nets, optimizers, schedulers, scaler
        self.configs, self.shown = configs, tuple(shown)
        self.meter = WindowMeter()
        self.start, skipped_total = 0, 0
        if s.ckpt is not None:
            for name, net in nets.items():
                net.load_state_dict(s.ckpt[name])
            for name, opt in optimizers.items():
                opt.load_state_dict(s.ckpt["optimizers"][name])
            for name, sched in schedulers.items():
                sched.load_state_dict(s.ckpt["schedulers"][name])
                _sync_lr(sched)
            scaler.load_state_dict(s.ckpt["scaler"])
            self.meter.load_state_dict(s.ckpt["log_window"])
            self.start, skipped_total = int(s.ckpt["step"]), int(s.ckpt["skipped_total"])
        _restore_rng(s, opts.seed)
        self.bad = BadStepCounter(opts.max_bad_steps, stage, s.ckpt_path, skipped_total)
        self.log = LossLog(s.out_dir / "losses.csv", columns, s.ckpt["log_rows"] if s.ckpt else [], s.info.main)
        self.progress = Progress(stage, s.total, self.start, s.info.main)

    def loader(self, data_dir: Path, groups: int) -> DataLoader:
        """The batches of the steps this run still has to make (up to ``stop_after``)."""
        o, s = self.opts, self.s
        return _loader(data_dir, lr_patch=o.lr_patch, seed=o.seed, total_steps=s.total, batch_size=o.batch_size,
                       start_step=self.start, end_step=s.total if self.stop_after is None else self.stop_after,
                       info=s.info, groups=groups, workers=o.workers, device=s.device)

    def step_done(self, step: int, values: Mapping[str, float], skipped: bool, lrs: Mapping[str, float]) -> None:
        """After 1-based ``step``: add its rank-mean ``values`` to the window, count a skip (may raise
        NonFiniteLossError), write a log row every ``log_every`` steps (``lrs``: the learning rates the
        step used) and a checkpoint every ``ckpt_every`` steps, at the end and at ``stop_after``."""
        self.meter.add(values, skipped)
        self.progress.step()
        self.bad.update(skipped, step)
        if step % self.opts.log_every == 0:
            self._log_row(step, lrs)
        if step < self.s.total and (step % self.opts.ckpt_every == 0 or step == self.stop_after):
            self.checkpoint(step)  # the last one: finish(), once generator.pt exists

    def _log_row(self, step: int, lrs: Mapping[str, float]) -> None:
        m = self.meter.means()
        row = {"step": step, "epoch": _epoch_of(step, self.opts.iters_per_epoch),
               **{k: v for k, v in m.items() if k in self.log.columns}, **lrs, "skipped": self.meter.skipped,
               **_noise_row(self.nets["G"])}
        self.log.append(row)
        self.progress.report(step, row["epoch"], {k: row[k] for k in self.shown})
        sps = self.meter.seconds_per_step()
        self.track_metrics({**{k: v for k, v in row.items() if k not in ("step", "epoch")},
                            **{k: v for k, v in m.items() if k not in row},  # gradient norms
                            "skipped_total": self.bad.total, "step_time_s": sps,
                            "patches_per_s": self.opts.batch_size / sps}, step)
        self.meter.reset()

    def track_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log scalars at ``step`` to MLflow (rank 0, when a tracker is given)."""
        if self.tracker is not None and self.s.info.main:
            self.tracker.log_metrics(metrics, step)

    def track_artifact(self, path: Path, folder: str | None = None) -> None:
        """Upload a written file to MLflow (rank 0, when a tracker is given)."""
        if self.tracker is not None and self.s.info.main:
            self.tracker.log_artifact(path, folder)

    def checkpoint(self, step: int, finished: bool = False) -> None:
        """Write checkpoint.pt at ``step`` from rank 0 (every rank joins the RNG gather).

        ``finished`` marks the run complete (only after generator.pt is written): a rerun
        of the stage on a finished checkpoint retrains instead of resuming it.

        Raises NonFiniteLossError instead when a weight is not finite, so the last
        good checkpoint is never overwritten.
        """
        s = self.s
        if not _weights_finite(*self.nets.values()):
            raise NonFiniteLossError(f"{self.stage}: weights are not finite at step {step}; "
                                     f"the last good checkpoint {s.ckpt_path} is intact")
        rng = _gather_rng(s.device, s.info)
        if s.info.main:
            save_checkpoint(s.ckpt_path, {
                "format": CHECKPOINT_FORMAT, "stage": self.stage, "config": s.resolved, "step": step,
                "finished": finished, "epoch": _epoch_of(step, self.opts.iters_per_epoch) if step else 0,
                "world_size": s.info.world,
                **self.configs, **{name: net.state_dict() for name, net in self.nets.items()},
                "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
                "schedulers": {name: sched.state_dict() for name, sched in self.schedulers.items()},
                "scaler": self.scaler.state_dict(), "rng": rng, "skipped_total": self.bad.total,
                "log_window": self.meter.state_dict(), "log_rows": self.log.rows,
                "data": {"seed": self.opts.seed, "batch_size": self.opts.batch_size, "next_step": step}})

    def finish(self, step: int, G: nn.Module, gen_cfg: Any) -> Path:
        """End the stage after ``step``: checkpoint.pt's path when stopped early, else write (rank 0) and
        return generator.pt holding ``G``. Every rank returns once rank 0 has written."""
        s = self.s
        self.progress.close()
        if step < s.total:
            if s.ckpt is None and step == 0:
                self.checkpoint(step)  # stop_after=0: the caller still gets a checkpoint
            _finish(s.info)
            return s.ckpt_path
        gen_path = s.out_dir / "generator.pt"
        if s.info.main:
            save_generator(gen_path, G, gen_cfg, {"stage": self.stage, "steps": s.total, "seed": self.opts.seed,
                                                  "train_config": s.resolved, "torch": str(torch.__version__)})
        # Marked finished only once generator.pt exists: a run killed before that resumes instead of retraining.
        self.checkpoint(step, finished=True)
        self.track_artifact(gen_path)
        _finish(s.info)
        return gen_path


# ---------------------------------------------------------------------------
# Stage 1: L1 pretraining
# ---------------------------------------------------------------------------


def pretrain(opts: PretrainOptions, *, data_dir, out_dir, gen_cfg, device: str | None = None, tracker=None,
             stop_after: int | None = None) -> Path:
    """Pretrain the generator with L1(G(y), x) (report Eq. 3); resumes from out_dir/checkpoint.pt.

    ``opts`` is params.yaml's ``pretrain`` section; ``data_dir`` holds hr/*.npy
    and lr/*.npy; ``gen_cfg`` is a GeneratorConfig or its params mapping.
    ``opts.noise=False`` trains with every noise scale frozen at its initial
    value (0) and no noise drawn. Writes checkpoint.pt, generator.pt,
    losses.csv and training_options.json under ``out_dir``. Returns
    out_dir/generator.pt, or out_dir/checkpoint.pt when ``stop_after`` ended
    the run early. Raises NonFiniteLossError after ``max_bad_steps``
    consecutive bad steps, TypeError when ``opts`` is not a PretrainOptions.
    """
    from srmap.nets import Generator

    if not isinstance(opts, PretrainOptions):
        raise TypeError(f"pretrain: expected PretrainOptions, got {type(opts).__name__}")
    gen_cfg = _gen_config(gen_cfg)
    data_dir = Path(data_dir).resolve()
    resolved = _plain({"stage": "pretrain", **dataclasses.asdict(opts), "gen_cfg": gen_cfg, "data_dir": data_dir,
                       "data_fingerprint": data_fingerprint(data_dir), "code_sha256": code_fingerprint()})
    total = opts.epochs * opts.iters_per_epoch
    s = _begin("pretrain", out_dir, resolved, seed=opts.seed, channels_last=opts.channels_last, device=device,
               total=total)
    G = _prepare(Generator(gen_cfg), s.device, s.channels_last).train()
    if not opts.noise:  # frozen scales get no gradient, so Adam never moves them
        for inj in G.injectors():
            inj.scale.requires_grad_(False)
    noise_scale = 1.0 if opts.noise else 0.0
    params = [p for p in G.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=opts.lr, betas=opts.betas)
    sched = _scheduler(opt, opts.milestones, opts.iters_per_epoch, opts.lr_gamma)
    # bf16 autocast needs no loss scaling; the scaler is kept (disabled) so
    # checkpoints have one format whatever the precision.
    scaler = torch.amp.GradScaler(s.device.type, enabled=False)
    tail = _Tail(s, "pretrain", opts, nets={"G": G}, optimizers={"G": opt}, schedulers={"G": sched}, scaler=scaler,
                 configs={"gen_config": dataclasses.asdict(gen_cfg)}, columns=PRETRAIN_COLUMNS, shown=("l1", "lr"),
                 tracker=tracker, stop_after=stop_after)
    G_run = _wrap_ddp(G, s.info, s.device)
    if opts.compile and s.cuda:
        G_run = torch.compile(G_run)
    loader = tail.loader(data_dir, groups=1)

    step = tail.start
    for lr_u8, hr_u8 in loader:
        y = _to_float(lr_u8, s.device, s.channels_last)  # (n,3,p,p)
        x = _to_float(hr_u8, s.device, s.channels_last)  # (n,3,4p,4p)
        rngs = noise_rngs(opts.seed, loader.batch_sampler.indices(step), s.device) if opts.noise else None
        with _autocast(s.device, opts.amp):
            sr = G_run(y, noise_scale=noise_scale, rngs=rngs)  # (n,3,4p,4p)
        loss = l1_loss(sr, x)  # float32, outside autocast
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        gnorm = _grad_norm(params)
        l1_v, gnorm_v, bad_v = _all_mean([loss, gnorm, _finite_flag(loss, gnorm)], s.info)
        skip = bad_v > 0
        lr_now = opt.param_groups[0]["lr"]
        if not skip:
            scaler.step(opt)
        scaler.update()
        sched.step()
        step += 1
        tail.step_done(step, {"l1": l1_v, "grad_norm": gnorm_v}, skip, {"lr": lr_now})
    return tail.finish(step, G, gen_cfg)


# ---------------------------------------------------------------------------
# Stage 2: MAP-GAN training
# ---------------------------------------------------------------------------


def train_gan(opts: GanOptions, *, data_dir, out_dir, init_generator, gen_cfg, critic_cfg, device: str | None = None,
              tracker=None, stop_after: int | None = None) -> Path:
    """Train G with alpha*L_fid + L_adv against a relativistic critic with R1 (report Eqs. 4-7).

    ``opts`` is params.yaml's ``train_gan`` section. G starts from
    ``init_generator`` (a pretrain generator.pt, whose config must equal
    ``gen_cfg``), its noise scales set to ``opts.noise_init`` unless it is
    None; the critic (``critic_cfg``: a CriticConfig or its params mapping)
    starts fresh. As in the authors' trainer, each global batch of
    ``batch_size`` is split in two halves: the first half's HR patches and the
    fakes made from its own LR patches train the critic (with R1 on those HR
    patches); then the second half trains G (fidelity on its LR, fake i paired
    with its own HR patch i). ``alpha`` and ``r1_gamma`` are in our [0,1]
    image units (docs/training.md converts the authors' 0-255 ones). After
    every step the EMA of G (``ema_beta``) is updated; it is what
    generator.pt, the monitor grids and evaluation use. Writes checkpoint.pt
    (raw G, G_ema, critic, optimisers, ...), generator.pt (G_ema), losses.csv,
    training_options.json and monitor/step_*.png under ``out_dir``. Returns
    out_dir/generator.pt, or out_dir/checkpoint.pt when ``stop_after`` ended
    the run early. Raises NonFiniteLossError after ``max_bad_steps``
    consecutive bad steps; ValueError when the critic's input size is not
    4 x lr_patch or init_generator's config differs from ``gen_cfg``;
    FileNotFoundError when init_generator is missing; TypeError when ``opts``
    is not a GanOptions.
    """
    import copy

    from srmap.inference import load_generator
    from srmap.nets import Critic

    if not isinstance(opts, GanOptions):
        raise TypeError(f"train_gan: expected GanOptions, got {type(opts).__name__}")
    gen_cfg, critic_cfg = _gen_config(gen_cfg), _critic_config(critic_cfg)
    data_dir, init_generator = Path(data_dir).resolve(), Path(init_generator).resolve()
    if critic_cfg.in_size != SCALE * opts.lr_patch:
        raise ValueError(f"model.critic: in_size {critic_cfg.in_size} (basis_size x 2**stages) must equal "
                         f"4 x lr_patch = {SCALE * opts.lr_patch}")
    if not init_generator.is_file():
        raise FileNotFoundError(f"init_generator {init_generator} does not exist (run the pretrain stage first)")
    resolved = _plain({"stage": "train_gan", **dataclasses.asdict(opts), "gen_cfg": gen_cfg,
                       "critic_cfg": critic_cfg, "data_dir": data_dir, "data_fingerprint": data_fingerprint(data_dir),
                       "init_generator": init_generator, "init_generator_sha256": sha256_file(init_generator),
                       "code_sha256": code_fingerprint()})
    total = opts.epochs * opts.iters_per_epoch
    s = _begin("train_gan", out_dir, resolved, seed=opts.seed, channels_last=opts.channels_last, device=device,
               total=total)
    G0 = load_generator(init_generator)
    if G0.cfg != gen_cfg:
        raise ValueError(f"init_generator {init_generator}: its generator config {dataclasses.asdict(G0.cfg)} "
                         f"differs from model.generator {dataclasses.asdict(gen_cfg)}")
    if opts.noise_init is not None:
        G0.set_noise_scales(opts.noise_init)
    G = _prepare(G0.requires_grad_(True), s.device, s.channels_last).train()
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    D = _prepare(Critic(critic_cfg), s.device, s.channels_last).train()
    opt_g = torch.optim.Adam(G.parameters(), lr=opts.lr_g, betas=opts.betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=opts.lr_d, betas=opts.betas)
    sched_g = _scheduler(opt_g, opts.milestones, opts.iters_per_epoch, opts.lr_gamma)
    sched_d = _scheduler(opt_d, opts.milestones, opts.iters_per_epoch, opts.lr_gamma)
    scaler = torch.amp.GradScaler(s.device.type, enabled=False)  # see pretrain
    tail = _Tail(s, "train_gan", opts, nets={"G": G, "G_ema": G_ema, "D": D},
                 optimizers={"G": opt_g, "D": opt_d}, schedulers={"G": sched_g, "D": sched_d}, scaler=scaler,
                 configs={"gen_config": dataclasses.asdict(gen_cfg), "critic_config": dataclasses.asdict(critic_cfg)},
                 columns=GAN_COLUMNS, shown=("fidelity", "generator", "critic", "r1"), tracker=tracker,
                 stop_after=stop_after)
    G_run = _wrap_ddp(G, s.info, s.device)
    if opts.compile and s.cuda:
        G_run = torch.compile(G_run)
    # The critic is never compiled: the R1 penalty needs a double backward,
    # which torch.compile does not support.
    D_run = _wrap_ddp(D, s.info, s.device)
    monitor = s.out_dir / "monitor"
    if s.info.main:
        _clear_monitor(monitor, tail.start if s.ckpt else -1)
    loader = tail.loader(data_dir, groups=2)
    params_g, params_d = list(G.parameters()), list(D.parameters())
    half = opts.batch_size // 2 // s.info.world  # patches per half per rank

    step = tail.start
    for lr_u8, hr_u8 in loader:
        y_d = _to_float(lr_u8[:half], s.device, s.channels_last)  # (h,3,p,p) critic half: LR -> fakes
        x_d = _to_float(hr_u8[:half], s.device, s.channels_last)  # (h,3,4p,4p) critic half: reals
        y_g = _to_float(lr_u8[half:], s.device, s.channels_last)  # (h,3,p,p) generator half
        x_g = _to_float(hr_u8[half:], s.device, s.channels_last)  # (h,3,4p,4p) its paired reals
        indices = loader.batch_sampler.indices(step)

        # Critic step: reals of the critic half against fakes from that half's own LR; R1 on the reals.
        _requires_grad(D, True)
        with torch.no_grad(), _autocast(s.device, opts.amp):
            fake_d = G_run(y_d, rngs=noise_rngs(opts.seed, indices[:half], s.device))  # (h,3,4p,4p)
        x_in = x_d.detach().requires_grad_(True)
        with _autocast(s.device, opts.amp):
            c_real = D_run(x_in)  # (h,) float32 (the head runs in float32)
            c_fake = D_run(fake_d)  # (h,)
        adv_d = critic_adv_loss(c_real, c_fake, opts.adv_loss)
        r1 = r1_penalty(c_real, x_in)
        loss_d = adv_d + 0.5 * opts.r1_gamma * r1
        opt_d.zero_grad(set_to_none=True)
        scaler.scale(loss_d).backward()
        scaler.unscale_(opt_d)
        gnorm_d = _grad_norm(params_d)
        adv_d_v, r1_v, gnorm_d_v, bad_d = _all_mean([adv_d, r1, gnorm_d, _finite_flag(loss_d, gnorm_d)], s.info)
        if bad_d == 0:
            scaler.step(opt_d)

        # Generator step against the updated critic; the critic is frozen so it gets no gradients.
        _requires_grad(D, False)
        with _autocast(s.device, opts.amp):
            sr = G_run(y_g, rngs=noise_rngs(opts.seed, indices[half:], s.device))  # (h,3,4p,4p)
            c_fake = D(sr)  # (h,)
            with torch.no_grad():
                c_real = D(x_g)  # (h,)
        fid = fidelity_loss(y_g, sr, border=FIDELITY_BORDER)  # float32, outside autocast
        adv_g = generator_adv_loss(c_fake, c_real, opts.adv_loss)
        loss_g = opts.alpha * fid + adv_g
        opt_g.zero_grad(set_to_none=True)
        scaler.scale(loss_g).backward()
        scaler.unscale_(opt_g)
        gnorm_g = _grad_norm(params_g)
        fid_v, adv_g_v, gnorm_g_v, bad_g = _all_mean([fid, adv_g, gnorm_g, _finite_flag(loss_g, gnorm_g)], s.info)
        lr_g_now, lr_d_now = opt_g.param_groups[0]["lr"], opt_d.param_groups[0]["lr"]
        # Each network skips its own bad update; the step counts as skipped if either did.
        if bad_g == 0:
            scaler.step(opt_g)
        scaler.update()
        sched_g.step()
        sched_d.step()
        ema_update(G_ema, G, opts.ema_beta)
        step += 1

        if step % opts.image_every == 0 and s.info.main:
            png = monitor / f"step_{step:08d}.png"
            with torch.no_grad(), _autocast(s.device, opts.amp):
                sr_ema = G_ema(y_g, seed=0)
            _save_monitor(png, y_g.detach(), sr_ema.detach(), x_g.detach())
            tail.track_artifact(png, "monitor")
        tail.step_done(step, {"fidelity": fid_v, "generator": adv_g_v, "critic": adv_d_v, "r1": r1_v,
                              "grad_norm_g": gnorm_g_v, "grad_norm_d": gnorm_d_v}, bad_g > 0 or bad_d > 0,
                       {"lr_g": lr_g_now, "lr_d": lr_d_now})
    return tail.finish(step, G_ema, gen_cfg)
