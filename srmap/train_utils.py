"""Training utilities that both loops of :mod:`srmap.train` use, none of them specific to SRMAP's method.

* processes: :class:`DistInfo`, :func:`setup_distributed` (torchrun/DDP: nccl on
  CUDA, gloo on CPU), :func:`wrap_ddp`, :func:`all_mean`, :func:`gather_objects`;
* device options: :func:`device_options` (bf16 autocast, channels_last,
  torch.compile on CPU as on CUDA), :func:`autocast`, :func:`to_float`,
  :func:`flush_denormals` (subnormal floats to zero on every CPU thread);
* the schedule: :func:`lr_factor`, :func:`scheduler`;
* bookkeeping: :class:`LossLog` (losses.csv), :class:`WindowMeter`,
  :class:`Progress`, :class:`BadStepCounter` (the NaN guard), :func:`grad_norm`,
  :func:`finite_flag`, :func:`weights_finite`;
* :func:`ema_update`, and the monitoring grids (:func:`save_monitor`);
* the SLURM job's time limit: :func:`slurm_time_left`, :func:`stop_deadline`.
"""

from __future__ import annotations

import atexit
import bisect
import csv
import ctypes
import io
import math
import os
import random
import re
import subprocess
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from srmap.utils import atomic_path, atomic_write_text

MONITOR_SAMPLES = 4  # columns of a monitoring grid


class NonFiniteLossError(RuntimeError):
    """Raised when training produced ``max_bad_steps`` consecutive non-finite steps."""


# ---------------------------------------------------------------------------
# Processes
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


def setup_distributed(device: str | None) -> tuple[DistInfo, torch.device]:
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


def barrier(info: DistInfo) -> None:
    """Let every rank return only once rank 0 has written the stage's outputs."""
    if info.world > 1:
        dist.barrier()


def wrap_ddp(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel when ``info.world`` > 1 (on ``device``), else ``model`` itself."""
    if info.world == 1:
        return model
    # forward_sync_buffers=False: the only buffers are constant filter taps, and a
    # per-forward broadcast would add a collective to every critic call.
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                               forward_sync_buffers=False, gradient_as_bucket_view=True)


def all_mean(values: Sequence[Tensor], info: DistInfo) -> list[float]:
    """Mean over ranks of scalar tensors, returned as floats (one collective, one host sync)."""
    t = torch.stack([v.detach().float().reshape(()) for v in values])
    if info.world > 1:
        dist.all_reduce(t)
        t /= info.world
    return t.tolist()


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """``obj`` of every rank, in rank order, on every rank (a plain list of one on a single process)."""
    if info.world == 1:
        return [obj]
    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------
# Schedule and seeds
# ---------------------------------------------------------------------------


def lr_factor(step: int, milestone_steps: Sequence[int], gamma: float) -> float:
    """Multiplier of the base learning rate at 0-based ``step``: gamma ** (milestones passed)."""
    return gamma ** bisect.bisect_right(sorted(milestone_steps), step)


def scheduler(opt: torch.optim.Optimizer, milestones: Sequence[int], iters_per_epoch: int,
               gamma: float) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepping every iteration: lr x ``gamma`` ** (milestones, in epochs of ``iters_per_epoch``, passed).

    The authors' MultiStepLR schedule (option.py ``--decay``/``--gamma``) in closed form (:func:`lr_factor`).
    """
    # A closed form of the step, not MultiStepLR's running product, so a resume
    # with new milestones (e.g. more epochs) applies them correctly; LambdaLR
    # stores no lambda in its state_dict, so the current milestones win.
    steps = [int(m) * iters_per_epoch for m in milestones]
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, gamma))


def sync_lr(sched: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Set each param group's lr from ``sched`` at its current step (after loading a checkpoint's optimiser state)."""
    # The optimiser's state_dict carries the lr of the checkpointed schedule;
    # recompute it from the current one.
    for group, base, fn in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base * fn(sched.last_epoch)


def seed_all(seed: int, rank: int = 0) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) from (``seed``, ``rank``): distinct streams per rank."""
    # Ranks get distinct streams so their noise injections differ.
    s = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


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
# Step machinery: NaN guard, precision, EMA, monitor grids
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


def grad_norm(params: Sequence[nn.Parameter]) -> Tensor:
    """The global L2 norm of the gradients of ``params`` (those with a gradient): a float32 scalar tensor, 0 if none."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0)


def finite_flag(*tensors: Tensor) -> Tensor:
    """1.0 when any of the scalar tensors is NaN/inf, else 0.0 (stays on device, no sync)."""
    bad = torch.zeros((), dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        bad = bad | ~torch.isfinite(t.detach().float().to(bad.device))
    return bad.float()


def weights_finite(*models: nn.Module) -> bool:
    """Whether every parameter of ``models`` is finite (no NaN or inf); True when they have none."""
    flags = [torch.isfinite(p).all() for m in models for p in m.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on ``device`` (CPU or CUDA) when ``amp``, else a no-op context."""
    # bf16 needs no loss scaling; fp16 is not offered. CPU autocast runs bf16 too
    # (device_options): the same code path as on CUDA, testable without a GPU.
    if amp:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


@dataclass(frozen=True)
class DeviceOptions:
    """The precision and speed options of a stage, as in effect on its device."""

    device: str  # torch device, e.g. "cuda:0" or "cpu"
    amp: bool  # forward passes under bf16 autocast (CUDA and CPU)
    channels_last: bool  # NHWC models and batches
    compile: bool  # torch.compile of the generator (inductor; on CPU it needs a C++ compiler)

    def describe(self) -> str:
        """One log line, e.g. ``device cpu: bf16 autocast on, channels_last on, torch.compile off``."""
        on = {True: "on", False: "off"}
        return (f"device {self.device}: bf16 autocast {on[self.amp]}, channels_last {on[self.channels_last]}, "
                f"torch.compile {on[self.compile]}")


def device_options(device: torch.device, *, amp: bool, channels_last: bool, compile: bool) -> DeviceOptions:
    """Resolve ``amp``/``channels_last``/``compile`` on ``device``; every flag means the same on CPU and CUDA.

    CPU: bf16 autocast (fast only with AVX512-BF16/AMX; results differ from
    float32 by bf16 rounding), NHWC (oneDNN) and inductor all work, so each flag
    is applied as given: nothing is silently ignored. Raises ValueError when a
    flag cannot apply: ``amp`` on a device without bf16 autocast (not CPU/CUDA),
    ``compile`` on CPU without a C++ compiler (inductor builds C++ kernels).
    """
    for name, v in (("amp", amp), ("channels_last", channels_last), ("compile", compile)):
        if not isinstance(v, bool):
            raise ValueError(f"{name}: expected true or false, got {v!r}")
    if amp and device.type not in ("cuda", "cpu"):
        raise ValueError(f"amp: bf16 autocast runs on cuda and cpu, not on {device.type}; set amp: false")
    if compile and device.type == "cpu":
        import shutil

        cxx = [c for c in (os.environ.get("CXX"), "c++", "g++", "clang++") if c and shutil.which(c)]
        if not cxx:
            raise ValueError("compile: torch.compile on CPU needs a C++ compiler (none of $CXX, c++, g++, clang++ "
                             "found on PATH); install one or set compile: false")
    return DeviceOptions(str(device), amp, channels_last, compile)


# ctypes signature of the function libgomp runs on every thread of a parallel region
_OMP_BODY = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


@_OMP_BODY
def _flush_this_thread(data) -> None:
    torch.set_flush_denormal(bool(data))  # data: 1 (flush) or NULL (keep subnormals)


def _openmp_runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime torch has loaded (GNU libgomp or LLVM/Intel's, which export the same GOMP_ entry
    points), found in /proc/self/maps; None when there is none or the platform has no /proc."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
        if re.search(r"/lib(gomp|iomp5|omp)[^/]*\.so", path):
            lib = ctypes.CDLL(path)
            if hasattr(lib, "GOMP_parallel"):
                return lib
    return None


def flush_denormals(on: bool = True) -> int:
    """Flush subnormal float32/float64 values to zero (x86 FTZ and DAZ) on this thread and on every thread
    of torch's OpenMP pool, or with ``on=False`` restore IEEE subnormals there; returns how many threads
    were set (0 where the CPU has no such mode).

    Why: SiLU's tail, silu'(z) ~ z e^z, sends gradients below float32's smallest normal
    (1.18e-38) for the strongly negative pre-activations that 0-255 scaled features
    reach; measured on the study generator's pretraining step (batch 16, LR 48²),
    about 5 % of the activations' input gradients were subnormal after three Adam
    steps, and x86 cores take microcode assists on each, which made the whole step
    2.3x slower (benchmarks/bench_denormal.py). Flushing them changes values
    below 1.18e-38 only; GPUs are untouched (the flag is CPU state).

    ``torch.set_flush_denormal`` sets the calling thread's MXCSR alone, and
    OpenMP worker threads neither inherit nor share it, so the same call is run
    once on every thread of a parallel region of the size torch uses
    (libgomp's ``GOMP_parallel``, through ctypes). A pool enlarged later by
    ``torch.set_num_threads`` gets new threads without the flag: call this again.
    Never raises; where no OpenMP runtime is found only the calling thread is set.
    """
    if not torch.set_flush_denormal(on):  # not x86 with SSE3: no FTZ/DAZ to set
        return 0
    omp = _openmp_runtime()
    threads = max(1, torch.get_num_threads())
    if omp is None or threads == 1:
        return 1
    omp.GOMP_parallel.argtypes = [_OMP_BODY, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    omp.GOMP_parallel.restype = None
    omp.GOMP_parallel(_flush_this_thread, 1 if on else None, threads, 0)
    return threads


def prepare_model(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """``model`` moved to ``device``, in channels_last memory format when asked; returns the same module."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def requires_grad(model: nn.Module, flag: bool) -> None:
    """Set ``requires_grad`` of every parameter of ``model`` to ``flag`` (freezes the critic in G's step)."""
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


def to_float(batch: Tensor, device: torch.device, channels_last: bool) -> Tensor:
    """uint8 (N,3,H,W) -> float32 in [0,1] on ``device``."""
    x = batch.to(device, non_blocking=True).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def noise_row(G: nn.Module) -> dict[str, float]:
    """Mean |noise scale| per injector group, keyed by the NOISE_COLUMNS names."""
    return {f"noise_{k}": v for k, v in G.noise_scale_means().items()}


def clear_monitor(folder: Path, after_step: int) -> None:
    """Delete ``folder``/step_*.png grids of steps after ``after_step`` (-1: all); a missing folder is fine."""
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


def save_monitor(path: Path, y: Tensor, sr: Tensor, hr: Tensor) -> None:
    """Grid of up to MONITOR_SAMPLES columns: rows LR (nearest x4), SR, HR; floats in [0,1] NCHW."""
    from torchvision.utils import make_grid

    k = min(MONITOR_SAMPLES, y.shape[0])
    up = torch.nn.functional.interpolate(y[:k].float(), scale_factor=sr.shape[-1] // y.shape[-1], mode="nearest")
    rows = torch.cat([up, sr[:k].float().clamp(0, 1), hr[:k].float()]).cpu()
    grid = make_grid(rows, nrow=k, padding=2, pad_value=1.0)
    img = grid.mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(img).save(tmp, format="PNG")


STOP_BEFORE_LIMIT_ENV = "SRMAP_STOP_BEFORE_LIMIT"  # seconds before a SLURM job's time limit to stop training
STOP_BEFORE_LIMIT_S = 600.0  # its default: room for the step in flight and a checkpoint of the paper nets
TIME_LIMIT_EXIT = 75  # exit status of a stage stopped ahead of its job's time limit (sysexits EX_TEMPFAIL: retry)


def parse_slurm_duration(text: str) -> float | None:
    """Seconds in a SLURM duration as squeue's ``%L`` prints it: ``[days-][hours:]minutes:seconds``.

    Returns None for ``UNLIMITED``, ``NOT_SET``, ``INVALID`` or anything else
    that is not a duration. Source: squeue(1), "%L Time left for the job".
    """
    m = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", text.strip())
    if m is None:
        return None
    days, hours, minutes, seconds = (int(g) if g else 0 for g in m.groups())
    return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)


def slurm_time_left(env: Mapping[str, str] = os.environ) -> float | None:
    """Seconds before this SLURM job's time limit (``squeue -h -j $SLURM_JOB_ID -o %L``), or None.

    None outside SLURM (no ``SLURM_JOB_ID``), for a job without a limit, or
    when squeue cannot answer (then with a warning: training stops on
    signals only).
    """
    job = env.get("SLURM_JOB_ID")
    if not job:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        warnings.warn(f"SLURM job {job}: cannot read its time limit with squeue ({exc}); training stops on "
                      f"signals only", RuntimeWarning, stacklevel=2)
        return None
    return parse_slurm_duration(out.stdout)


def stop_deadline(time_left: float | None, env: Mapping[str, str] = os.environ) -> tuple[float | None, float]:
    """(time.monotonic() at which training stops itself, the margin in seconds) for a job with ``time_left`` s.

    The margin is ``$SRMAP_STOP_BEFORE_LIMIT`` (default 600 s), capped at half
    the time left so that a short job still makes progress. No deadline
    (None) when ``time_left`` is None. Raises ValueError naming the variable
    when it is not a non-negative number.
    """
    raw = env.get(STOP_BEFORE_LIMIT_ENV, "")
    try:
        margin = float(raw) if raw.strip() else STOP_BEFORE_LIMIT_S
    except ValueError:
        margin = -1.0
    if not (margin >= 0 and math.isfinite(margin)):
        raise ValueError(f"${STOP_BEFORE_LIMIT_ENV}={raw!r}: expected seconds (a number >= 0)")
    if time_left is None:
        return None, margin
    margin = min(margin, time_left / 2)
    return time.monotonic() + time_left - margin, margin


def epoch_of(step: int, iters_per_epoch: int) -> int:
    """1-based epoch of 1-based ``step``."""
    return (step - 1) // iters_per_epoch + 1
