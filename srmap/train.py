"""Training: L1 pretraining of the generator (:func:`pretrain`), then MAP-GAN training (:func:`train_gan`).

One explicit loop per stage, each taking its options record
(:class:`~srmap.options.PretrainOptions` / :class:`~srmap.options.GanOptions`: the
``pretrain`` / ``train_gan`` sections of params.yaml). What surrounds a step
(resume, checkpoints, signals, the NaN guard, logging, the end of a stage) is
written once, in :class:`_Harness` below the loops; resume state is
:mod:`srmap.resume`, the generic utilities :mod:`srmap.train_utils`, the
patches and their order :mod:`srmap.data`. docs/training.md explains the
outputs, the resume rules, signals and our choices.
"""

from __future__ import annotations

import copy
import dataclasses
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from srmap.checkpoint import load_generator, save_checkpoint, save_generator
from srmap.data import step_loader
from srmap.losses import HR_CONTEXT, critic_adv_loss, fidelity_loss, generator_adv_loss, l1_loss, r1_penalty
from srmap.nets import Critic, Generator
from srmap.noise import training_keys
from srmap.options import LOSSES, SCALE, CriticConfig, GanOptions, GeneratorConfig, PretrainOptions, from_params
from srmap.resize import project_consistent
from srmap.resume import (CHECKPOINT_FORMAT, code_fingerprint, data_fingerprint, decide, plain, rng_state,
                          set_rng_state)
from srmap.tracking import NULL_TRACKER
from srmap.train_utils import (TIME_LIMIT_EXIT, BadStepCounter, LossLog, NonFiniteLossError, Progress, WindowMeter,
                               all_mean, autocast, barrier, clear_monitor, device_options, ema_update, epoch_of,
                               finite_flag, flush_denormals, gather_objects, grad_norm, noise_row, prepare_model,
                               requires_grad, save_monitor, scheduler, seed_all, setup_distributed, slurm_time_left,
                               stop_deadline, sync_lr, to_float, weights_finite, wrap_ddp)
from srmap.utils import Interrupted, atomic_write_json, sha256_file

__all__ = ["pretrain", "train_gan", "TrainingStopped", "NonFiniteLossError", "PRETRAIN_COLUMNS", "GAN_COLUMNS"]

# Mean |noise scale| of each injector group (srmap.nets.Generator.injector_groups), logged at every log step.
NOISE_COLUMNS = ("noise_stem", "noise_trunk", "noise_features", "noise_up_x2", "noise_up_x4")
PRETRAIN_COLUMNS = ("step", "epoch", *LOSSES["pretrain"], "lr", "skipped") + NOISE_COLUMNS
GAN_COLUMNS = ("step", "epoch", *LOSSES["train_gan"], "lr_g", "lr_d", "skipped") + NOISE_COLUMNS
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")  # stop at the next step boundary with a checkpoint
_TIME_LIMIT = 255  # stop flag of a passed SLURM deadline (above every signal number)


class TrainingStopped(Interrupted):
    """Training stopped after writing a checkpoint of its last step: on a signal (``exit_code`` = 128 + signal),
    or ahead of its SLURM job's time limit (``exit_code`` = 75)."""


# ---------------------------------------------------------------------------
# Stage 1: L1 pretraining
# ---------------------------------------------------------------------------


def pretrain(opts: PretrainOptions, *, data_dir, out_dir, gen_cfg, device: str | None = None,
             tracker=NULL_TRACKER, stop_after: int | None = None) -> Path:
    """Pretrain the generator with L1(G(y), x) (report Eq. 3); resumes from out_dir/checkpoint.pt.

    ``data_dir`` holds the degrade stage's train/{hr,lr}/*.npy; ``gen_cfg`` is a
    GeneratorConfig or its params mapping; ``opts.noise=False`` keeps every
    noise scale at 0 and draws no noise. Writes checkpoint.pt, generator.pt,
    losses.csv and training_options.json under ``out_dir`` (docs/training.md).
    Returns out_dir/generator.pt, or out_dir/checkpoint.pt when ``stop_after``
    ended the run early. Raises NonFiniteLossError after ``max_bad_steps``
    consecutive bad steps, TrainingStopped on SIGTERM/SIGINT/SIGUSR1 (after a
    checkpoint), TypeError when ``opts`` is not a PretrainOptions.
    """
    if not isinstance(opts, PretrainOptions):
        raise TypeError(f"pretrain: expected PretrainOptions, got {type(opts).__name__}")
    gen_cfg = _config(GeneratorConfig, gen_cfg, "model.generator")
    data_dir = Path(data_dir).resolve()
    resolved = plain({"stage": "pretrain", **dataclasses.asdict(opts), "gen_cfg": gen_cfg, "data_dir": data_dir,
                      "data_fingerprint": data_fingerprint(data_dir), "code_sha256": code_fingerprint()})
    s = _begin("pretrain", opts, out_dir, resolved, device)
    G = prepare_model(Generator(gen_cfg), s.device, s.channels_last).train()
    if not opts.noise:  # frozen scales get no gradient, so Adam never moves them
        for inj in G.injectors():
            inj.scale.requires_grad_(False)
    params = [p for p in G.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=opts.lr, betas=opts.betas)
    sched = scheduler(opt, opts.milestones, opts.iters_per_epoch, opts.lr_gamma)
    G_run = _compiled(wrap_ddp(G, s.info, s.device), s.compile)

    with _Harness(s, opts, nets={"G": G}, optimizers={"G": opt}, schedulers={"G": sched},
                  configs={"gen_config": dataclasses.asdict(gen_cfg)}, columns=PRETRAIN_COLUMNS,
                  tracker=tracker, stop_after=stop_after) as harness:
        loader = harness.loader(data_dir, groups=1)
        step = harness.start
        for lr_u8, hr_u8 in loader:
            y = to_float(lr_u8, s.device, s.channels_last)  # (n,3,p,p)
            x = to_float(hr_u8, s.device, s.channels_last)  # (n,3,4p,4p)
            keys = harness.noise_keys(loader, step, slice(None)) if opts.noise else None
            with autocast(s.device, s.amp):
                sr = G_run(y, seed=keys, noise_scale=1.0 if opts.noise else 0.0)  # (n,3,4p,4p)
            loss = l1_loss(sr, x)  # float32, outside autocast
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = grad_norm(params)
            l1_v, gnorm_v, bad_v = all_mean([loss, gnorm, finite_flag(loss, gnorm)], s.info)
            lr_now = opt.param_groups[0]["lr"]
            if bad_v == 0:
                opt.step()
            sched.step()
            step += 1
            harness.step_done(step, {"l1": l1_v, "grad_norm": gnorm_v}, bad_v > 0, {"lr": lr_now})
        return harness.finish(step, G, gen_cfg)


# ---------------------------------------------------------------------------
# Stage 2: MAP-GAN training
# ---------------------------------------------------------------------------


def train_gan(opts: GanOptions, *, data_dir, out_dir, init_generator, gen_cfg, critic_cfg, device: str | None = None,
              tracker=NULL_TRACKER, stop_after: int | None = None) -> Path:
    """Train G with alpha*L_fid + L_adv against a relativistic critic with R1 (report Eqs. 4-7).

    G starts from ``init_generator`` (a pretrain generator.pt of config
    ``gen_cfg``), its noise scales set to ``opts.noise_init`` unless None; the
    critic (``critic_cfg``) starts fresh. Each global batch is split in two
    halves, the first training the critic, the second G, as in the authors'
    trainer; after every step the EMA of G is updated, and generator.pt holds
    the EMA (docs/training.md, "Losses, optimiser and schedule"). Writes
    checkpoint.pt, generator.pt, losses.csv, training_options.json and
    monitor/step_*.png under ``out_dir``. Returns out_dir/generator.pt, or
    out_dir/checkpoint.pt when ``stop_after`` ended the run early. Raises
    NonFiniteLossError, TrainingStopped (as :func:`pretrain`); ValueError when
    the critic's input size is not 4 x lr_patch or init_generator's config
    differs from ``gen_cfg``; FileNotFoundError when init_generator is missing.
    """
    if not isinstance(opts, GanOptions):
        raise TypeError(f"train_gan: expected GanOptions, got {type(opts).__name__}")
    gen_cfg = _config(GeneratorConfig, gen_cfg, "model.generator")
    critic_cfg = _config(CriticConfig, critic_cfg, "model.critic")
    data_dir, init_generator = Path(data_dir).resolve(), Path(init_generator).resolve()
    if critic_cfg.in_size != SCALE * opts.lr_patch:
        raise ValueError(f"model.critic: in_size {critic_cfg.in_size} (basis_size x 2**stages) must equal "
                         f"{SCALE} x lr_patch = {SCALE * opts.lr_patch}")
    if not init_generator.is_file():
        raise FileNotFoundError(f"init_generator {init_generator} does not exist (run the pretrain stage first)")
    resolved = plain({"stage": "train_gan", **dataclasses.asdict(opts), "gen_cfg": gen_cfg, "critic_cfg": critic_cfg,
                      "data_dir": data_dir, "data_fingerprint": data_fingerprint(data_dir),
                      "init_generator": init_generator, "init_generator_sha256": sha256_file(init_generator),
                      "code_sha256": code_fingerprint()})
    s = _begin("train_gan", opts, out_dir, resolved, device)
    G0 = load_generator(init_generator)
    if G0.cfg != gen_cfg:
        raise ValueError(f"init_generator {init_generator}: its generator config {dataclasses.asdict(G0.cfg)} "
                         f"differs from model.generator {dataclasses.asdict(gen_cfg)}")
    if opts.noise_init is not None:
        G0.set_noise_scales(opts.noise_init)
    G = prepare_model(G0.requires_grad_(True), s.device, s.channels_last).train()
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    D = prepare_model(Critic(critic_cfg), s.device, s.channels_last).train()
    opt_g = torch.optim.Adam(G.parameters(), lr=opts.lr_g, betas=opts.betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=opts.lr_d, betas=opts.betas)
    sched_g = scheduler(opt_g, opts.milestones, opts.iters_per_epoch, opts.lr_gamma)
    sched_d = scheduler(opt_d, opts.milestones, opts.iters_per_epoch, opts.lr_gamma)
    G_run = _compiled(wrap_ddp(G, s.info, s.device), s.compile)
    D_ddp = wrap_ddp(D, s.info, s.device)
    # R1 needs a double backward, which compiled graphs do not support: the critic's pass on the reals of its
    # own step stays eager; its other passes (fakes, and both passes of G's step) are compiled with G.
    D_run = _compiled(D_ddp, s.compile)
    params_g, params_d = list(G.parameters()), list(D.parameters())
    half = opts.batch_size // 2 // s.info.world  # patches per half per rank

    def consistent(sr, y):  # G's output as the losses see it; the projection in float32 even under bf16 autocast
        if opts.consistency != "project":
            return sr
        with torch.autocast(s.device.type, enabled=False):
            return project_consistent(sr.float(), y.float(), border=opts.fidelity_border)

    with _Harness(s, opts, nets={"G": G, "G_ema": G_ema, "D": D}, optimizers={"G": opt_g, "D": opt_d},
                  schedulers={"G": sched_g, "D": sched_d},
                  configs={"gen_config": dataclasses.asdict(gen_cfg), "critic_config": dataclasses.asdict(critic_cfg)},
                  columns=GAN_COLUMNS, tracker=tracker, stop_after=stop_after) as harness:
        monitor = s.out_dir / "monitor"
        if s.info.main:
            clear_monitor(monitor, harness.start if s.ckpt else -1)
        c = HR_CONTEXT if opts.fidelity_context else 0  # HR context ring of every patch (fidelity only)
        loader = harness.loader(data_dir, groups=2, hr_context=c)
        step = harness.start
        for lr_u8, hr_u8 in loader:
            hr_u8, ctx_u8 = (hr_u8[..., c:-c, c:-c], hr_u8[half:]) if c else (hr_u8, None)
            y_d = to_float(lr_u8[:half], s.device, s.channels_last)  # (h,3,p,p) critic half: LR -> fakes
            x_d = to_float(hr_u8[:half], s.device, s.channels_last)  # (h,3,4p,4p) critic half: reals
            y_g = to_float(lr_u8[half:], s.device, s.channels_last)  # (h,3,p,p) generator half
            x_g = to_float(hr_u8[half:], s.device, s.channels_last)  # (h,3,4p,4p) its paired reals
            ctx_g = None if ctx_u8 is None else to_float(ctx_u8, s.device, False)  # (h,3,4p+2c,4p+2c) or None

            # Critic step: reals of the critic half against fakes from that half's own LR; R1 on the reals.
            requires_grad(D, True)
            with torch.no_grad(), autocast(s.device, s.amp):
                fake_d = consistent(G_run(y_d, seed=harness.noise_keys(loader, step, slice(0, half))), y_d)
            x_in = x_d.detach().requires_grad_(True)
            with autocast(s.device, s.amp):
                c_real = D_ddp(x_in)  # (h,) float32 (the head runs in float32)
                c_fake = D_run(fake_d)  # (h,)
            adv_d = critic_adv_loss(c_real, c_fake, opts.adv_loss)
            r1 = r1_penalty(c_real, x_in)
            loss_d = adv_d + 0.5 * opts.r1_gamma * r1
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            gnorm_d = grad_norm(params_d)
            adv_d_v, r1_v, gnorm_d_v, bad_d = all_mean([adv_d, r1, gnorm_d, finite_flag(loss_d, gnorm_d)], s.info)
            if bad_d == 0:
                opt_d.step()

            # Generator step against the updated critic; the critic is frozen so it gets no gradients.
            requires_grad(D, False)
            with autocast(s.device, s.amp):
                sr = consistent(G_run(y_g, seed=harness.noise_keys(loader, step, slice(half, None))), y_g)
                c_fake = D_run(sr)  # (h,)
                with torch.no_grad():
                    c_real = D_run(x_g)  # (h,)
            fid = fidelity_loss(y_g, sr, border=opts.fidelity_border, clamp=opts.fidelity_clamp,
                                hr_context=ctx_g)  # float32
            adv_g = generator_adv_loss(c_fake, c_real, opts.adv_loss)
            loss_g = opts.alpha * fid + adv_g
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            gnorm_g = grad_norm(params_g)
            fid_v, adv_g_v, gnorm_g_v, bad_g = all_mean([fid, adv_g, gnorm_g, finite_flag(loss_g, gnorm_g)], s.info)
            lr_g_now, lr_d_now = opt_g.param_groups[0]["lr"], opt_d.param_groups[0]["lr"]
            if bad_g == 0:  # each network skips its own bad update; the step counts as skipped if either did
                opt_g.step()
            sched_g.step()
            sched_d.step()
            ema_update(G_ema, G, opts.ema_beta)
            step += 1

            if (step % opts.image_every == 0 or step == s.total) and s.info.main:  # the last step always: the
                # monitor/ folder is a declared output, so a run shorter than image_every still has one grid
                png = monitor / f"step_{step:08d}.png"
                with torch.no_grad(), autocast(s.device, s.amp):
                    sr_ema = consistent(G_ema(y_g, seed=0), y_g)
                save_monitor(png, y_g.detach(), sr_ema.detach(), x_g.detach())
                harness.tracker.log_artifact(png, "monitor")
            harness.step_done(step, {"fidelity": fid_v, "generator": adv_g_v, "critic": adv_d_v, "r1": r1_v,
                                     "grad_norm_g": gnorm_g_v, "grad_norm_d": gnorm_d_v}, bad_g > 0 or bad_d > 0,
                              {"lr_g": lr_g_now, "lr_d": lr_d_now})
        return harness.finish(step, G_ema, gen_cfg)


# ---------------------------------------------------------------------------
# The harness both loops share: setup, resume, checkpoints, signals, logging, the end of a stage
# ---------------------------------------------------------------------------


def _config(cls, cfg: Any, where: str):
    return cfg if isinstance(cfg, cls) else from_params(cls, cfg, where)


def _compiled(model: nn.Module, compile: bool) -> nn.Module:
    # dynamic=False: patch shapes are fixed, so one static graph per call site.
    return torch.compile(model, dynamic=False) if compile else model


@dataclass
class _Setup:
    """What a loop needs from setup: process, device, options in effect, paths, and the checkpoint to resume."""

    stage: str
    info: Any  # srmap.train_utils.DistInfo
    device: torch.device
    channels_last: bool  # NHWC models and batches (device_options)
    compile: bool  # torch.compile (device_options)
    amp: bool  # bf16 autocast (device_options)
    total: int  # total steps
    ckpt_path: Path
    out_dir: Path
    resolved: dict  # the guarded config (and the code fingerprint)
    ckpt: dict | None  # checkpoint to resume from (None = fresh start)


def _begin(stage: str, opts, out_dir: Any, resolved: dict, device: str | None) -> _Setup:
    """Join the process group, decide fresh start vs resume (setting a checkpoint aside), seed, write
    training_options.json."""
    info, dev = setup_distributed(device)
    in_effect = device_options(dev, amp=opts.amp, channels_last=opts.channels_last, compile=opts.compile)
    total = opts.epochs * opts.iters_per_epoch
    out = Path(out_dir).resolve()
    ckpt_path = out / "checkpoint.pt"
    decision = decide(ckpt_path, stage=stage, resolved=resolved, total=total, main=info.main)
    barrier(info)  # rank 0 may have renamed the checkpoint
    ckpt = decision.ckpt
    history = list(ckpt.get("code_history", [])) if ckpt else []
    if ckpt and decision.code_changed:
        old = ckpt["config"].get("code_sha256")
        history.append({"step": int(ckpt["step"]), "code_sha256": old})
        if info.main:
            print(f"{stage}: resuming {ckpt_path} at step {ckpt['step']}, written by other code "
                  f"(code_sha256 {str(old)[:12]} -> {resolved['code_sha256'][:12]}); recorded in "
                  f"training_options.json", file=sys.stderr, flush=True)
    elif ckpt and info.main:
        print(f"{stage}: resuming {ckpt_path} at step {ckpt['step']}", file=sys.stderr, flush=True)
    resolved = dict(resolved, code_history=history)
    seed_all(opts.seed)  # model initialisation is identical on every rank
    flushing = flush_denormals() if dev.type == "cpu" else 0  # subnormals cost 2.3x per step on x86
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed patch shapes: let cuDNN pick the fastest kernels once
    if info.main:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".*.tmp"):  # temporary files of writes that a killed run never renamed into place
            stale.unlink(missing_ok=True)
        atomic_write_json(out / "training_options.json", {
            "stage": stage, "config": resolved, "world_size": info.world, "device": str(dev),
            "torch": str(torch.__version__), "resumed_from_step": int(ckpt["step"]) if ckpt else None,
            "set_aside": str(decision.set_aside) if decision.set_aside else None,
            "in_effect": {"amp": in_effect.amp, "channels_last": in_effect.channels_last,
                          "compile": in_effect.compile, "flush_denormals_threads": flushing}})
        ftz = f", subnormals flushed on {flushing} thread(s)" if flushing else ""
        print(f"{stage}: {in_effect.describe()}{ftz}; {info.world} process(es)", file=sys.stderr, flush=True)
    return _Setup(stage, info, dev, in_effect.channels_last, in_effect.compile, in_effect.amp, total, ckpt_path, out,
                  resolved, ckpt)


class _Harness:
    """Everything around a step, written once for both loops (NVlabs/edm ``training_loop.py``).

    A loop builds its networks, optimisers and schedulers and hands them over by
    name (``"G"``, ``"G_ema"``, ``"D"``); entering the context restores them from
    ``s.ckpt`` and installs the stop-signal handlers, leaving it restores the
    old handlers. :meth:`step_done` keeps the window means, the NaN guard,
    losses.csv, MLflow, the progress display, the checkpoints and the stop
    signals; :meth:`finish` writes generator.pt. The step bodies stay in the loops.
    """

    def __init__(self, s: _Setup, opts, *, nets: Mapping[str, nn.Module],
                 optimizers: Mapping[str, torch.optim.Optimizer], schedulers: Mapping[str, Any],
                 configs: Mapping[str, Any], columns: Sequence[str], tracker, stop_after: int | None):
        self.s, self.opts, self.stop_after = s, opts, stop_after
        self.tracker = tracker if s.info.main else NULL_TRACKER
        self.nets, self.optimizers, self.schedulers, self.configs = nets, optimizers, schedulers, configs
        self.shown = LOSSES[s.stage] + ("lr",) if s.stage == "pretrain" else LOSSES[s.stage]
        self.meter = WindowMeter()
        self.start, skipped_total = 0, 0
        if s.ckpt is not None:
            for name, net in nets.items():
                net.load_state_dict(s.ckpt[name])
            for name, opt in optimizers.items():
                opt.load_state_dict(s.ckpt["optimizers"][name])
            for name, sched in schedulers.items():
                sched.load_state_dict(s.ckpt["schedulers"][name])
                sync_lr(sched)
            self.meter.load_state_dict(s.ckpt["log_window"])
            self.start, skipped_total = int(s.ckpt["step"]), int(s.ckpt["skipped_total"])
            states = s.ckpt["rng"]
            if len(states) == s.info.world:
                set_rng_state(states[s.info.rank], s.device)
        self.bad = BadStepCounter(opts.max_bad_steps, s.stage, s.ckpt_path, skipped_total)
        self.log = LossLog(s.out_dir / "losses.csv", columns, s.ckpt["log_rows"] if s.ckpt else [], s.info.main)
        self.progress = Progress(s.stage, s.total, self.start, s.info.main)
        self.signum: int | None = None
        self._old_handlers: dict[int, Any] = {}
        time_left = slurm_time_left()
        self.deadline, self.margin = stop_deadline(time_left)
        if time_left is not None and s.info.main:
            print(f"{s.stage}: SLURM job time limit in {time_left:.0f} s; "
                  f"training stops with a checkpoint {self.margin:.0f} s before it", file=sys.stderr, flush=True)

    # -- signals -----------------------------------------------------------------------
    def __enter__(self) -> "_Harness":
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                num = getattr(signal, name, None)
                if num is not None:
                    self._old_handlers[num] = signal.signal(num, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for num, old in self._old_handlers.items():
            signal.signal(num, old)
        self._old_handlers.clear()
        self.progress.close()

    def _on_signal(self, signum: int, frame) -> None:
        if self.signum == signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now (the last checkpoint is intact)
        self.signum = signum

    def _stop_requested(self) -> int:
        """The signal any rank received (0: none; _TIME_LIMIT: its job's deadline passed); every rank learns it
        in the same step."""
        late = self.deadline is not None and time.monotonic() >= self.deadline
        flag = torch.tensor([float(self.signum or (_TIME_LIMIT if late else 0))], device=self.s.device)
        if self.s.info.world > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    # -- per step ------------------------------------------------------------------------
    def loader(self, data_dir: Path, groups: int, hr_context: int = 0) -> DataLoader:
        """The batches of the steps this run still has to make (up to ``stop_after``); HR patches widened by
        ``hr_context`` px on each side (:class:`srmap.data.PatchDataset`)."""
        o, s = self.opts, self.s
        end = s.total if self.stop_after is None else self.stop_after
        return step_loader(data_dir, lr_patch=o.lr_patch, scale=SCALE, seed=o.seed, total_steps=s.total,
                           batch_size=o.batch_size, start_step=self.start, end_step=end, rank=s.info.rank,
                           world=s.info.world, groups=groups, workers=o.workers, pin_memory=s.device.type == "cuda",
                           hr_context=hr_context)

    def noise_keys(self, loader: DataLoader, step: int, part: slice) -> torch.Tensor:
        """Noise keys (int64 (n,) on the device) of this rank's samples ``part`` of 0-based ``step``: the run seed
        and each sample's global index (:func:`srmap.noise.training_keys`)."""
        indices = torch.tensor(loader.batch_sampler.indices(step)[part], dtype=torch.int64)
        return training_keys(self.opts.seed, indices).to(self.s.device, non_blocking=True)

    def step_done(self, step: int, values: Mapping[str, float], skipped: bool, lrs: Mapping[str, float]) -> None:
        """After 1-based ``step``: add its rank-mean ``values`` to the window, count a skip (may raise
        NonFiniteLossError), write a log row every ``log_every`` steps (``lrs``: the learning rates the step
        used), a checkpoint every ``ckpt_every`` steps and at ``stop_after``; on a stop signal, checkpoint this
        step and raise TrainingStopped."""
        self.meter.add(values, skipped)
        self.progress.step()
        self.bad.update(skipped, step)
        if step % self.opts.log_every == 0:
            self._log_row(step, lrs)
        signum = self._stop_requested()
        if signum and step < self.s.total:
            self.checkpoint(step)
            where = f"after step {step} of {self.s.total}; checkpoint {self.s.ckpt_path} written"
            if signum == _TIME_LIMIT:
                raise TrainingStopped(f"{self.s.stage}: stopped {self.margin:.0f} s before the SLURM job's time "
                                      f"limit {where}: the next job (or running the stage again) resumes",
                                      0, exit_code=TIME_LIMIT_EXIT)  # signum 0: no signal
            raise TrainingStopped(f"{self.s.stage}: stopped by {signal.Signals(signum).name} {where}: run the "
                                  f"stage again to resume", signum)
        if step < self.s.total and (step % self.opts.ckpt_every == 0 or step == self.stop_after):
            self.checkpoint(step)  # the last one: finish(), once generator.pt exists

    def _log_row(self, step: int, lrs: Mapping[str, float]) -> None:
        m = self.meter.means()
        row = {"step": step, "epoch": epoch_of(step, self.opts.iters_per_epoch),
               **{k: v for k, v in m.items() if k in self.log.columns}, **lrs, "skipped": self.meter.skipped,
               **noise_row(self.nets["G"])}
        self.log.append(row)
        self.progress.report(step, row["epoch"], {k: row[k] for k in self.shown})
        sps = self.meter.seconds_per_step()
        self.tracker.log_metrics({**{k: v for k, v in row.items() if k not in ("step", "epoch")},
                                  **{k: v for k, v in m.items() if k not in row},  # gradient norms
                                  "skipped_total": self.bad.total, "step_time_s": sps,
                                  "patches_per_s": self.opts.batch_size / sps}, step)
        self.meter.reset()

    def checkpoint(self, step: int, finished: bool = False) -> None:
        """Write checkpoint.pt at ``step`` from rank 0 (every rank joins the RNG gather).

        ``finished`` marks the run complete (only after generator.pt is written).
        Raises NonFiniteLossError instead when a weight is not finite, so the last
        good checkpoint is never overwritten.
        """
        s = self.s
        if not weights_finite(*self.nets.values()):
            raise NonFiniteLossError(f"{s.stage}: weights are not finite at step {step}; "
                                     f"the last good checkpoint {s.ckpt_path} is intact")
        rng = gather_objects(rng_state(s.device), s.info)
        if s.info.main:
            save_checkpoint(s.ckpt_path, {
                "format": CHECKPOINT_FORMAT, "stage": s.stage, "config": s.resolved, "step": step,
                "finished": finished, "epoch": epoch_of(step, self.opts.iters_per_epoch) if step else 0,
                "world_size": s.info.world, "code_history": s.resolved["code_history"],
                **self.configs, **{name: net.state_dict() for name, net in self.nets.items()},
                "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
                "schedulers": {name: sched.state_dict() for name, sched in self.schedulers.items()},
                "rng": rng, "skipped_total": self.bad.total, "log_window": self.meter.state_dict(),
                "log_rows": self.log.rows,
                "data": {"seed": self.opts.seed, "batch_size": self.opts.batch_size, "next_step": step}})

    def finish(self, step: int, G: nn.Module, gen_cfg: GeneratorConfig) -> Path:
        """End the stage after ``step``: checkpoint.pt's path when stopped early, else write (rank 0) and
        return generator.pt holding ``G``. Every rank returns once rank 0 has written."""
        s = self.s
        self.progress.close()
        if step < s.total:
            if s.ckpt is None and step == 0:
                self.checkpoint(step)  # stop_after=0: the caller still gets a checkpoint
            barrier(s.info)
            return s.ckpt_path
        gen_path = s.out_dir / "generator.pt"
        if s.info.main:
            save_generator(gen_path, G, gen_cfg, {"stage": s.stage, "steps": s.total, "seed": self.opts.seed,
                                                  "train_config": s.resolved, "torch": str(torch.__version__)})
        # Marked finished only once generator.pt exists: a run killed before that resumes instead of retraining.
        self.checkpoint(step, finished=True)
        self.tracker.log_artifact(gen_path)
        barrier(s.info)
        return gen_path
