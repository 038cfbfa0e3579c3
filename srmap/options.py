"""Options of the two training stages: one frozen dataclass each, the keys of params.yaml's sections.

:class:`PretrainOptions` is ``<profile>.pretrain`` and :class:`GanOptions` is
``<profile>.train_gan``. Each field's comment gives its unit and the source of
the paper profile's value: the report, the authors' code (``r-mohanty/Super-Rez``,
``src/option.py`` / ``src/demo.sh`` / ``src/trainer.py``) or ours
(docs/training.md has the table). ``srmap.config`` derives the params.yaml
schema (names and types) from these fields, and a value out of range raises
:class:`OptionError` when the record is built, so a new hyper-parameter is one
field here and one line in params.yaml.

Torch-free: the Snakefile imports srmap.config, which imports this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Literal, get_args, get_origin, get_type_hints


class OptionError(ValueError):
    """A training option out of range; ``key`` names the field, ``expected`` says what it must be."""

    def __init__(self, key: str, expected: str, value: Any):
        super().__init__(f"{key}: expected {expected}, got {value!r}")
        self.key, self.expected, self.value = key, expected, value


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# Range of each field, whichever stage has it: (test, what the value must be).
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "batch_size": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "lr_patch": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "lr": (lambda v: _is_num(v) and v > 0, "a number > 0"),
    "lr_g": (lambda v: _is_num(v) and v > 0, "a number > 0"),
    "lr_d": (lambda v: _is_num(v) and v > 0, "a number > 0"),
    "betas": (lambda v: len(v) == 2 and all(_is_num(b) and 0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    "alpha": (lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    "r1_gamma": (lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    "ema_beta": (lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    "noise_init": (lambda v: v is None or _is_num(v), "null (keep the pretrained scales) or a number"),
    "noise": (lambda v: isinstance(v, bool), "true/false"),
    "epochs": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "iters_per_epoch": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "milestones": (lambda v: all(_is_int(m) and m >= 1 for m in v), "positive epoch numbers"),
    "lr_gamma": (lambda v: _is_num(v) and v > 0, "a number > 0"),
    "image_every": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "ckpt_every": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "log_every": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "workers": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "max_bad_steps": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "amp": (lambda v: isinstance(v, bool), "true/false"),
    "channels_last": (lambda v: isinstance(v, bool), "true/false"),
    "compile": (lambda v: isinstance(v, bool), "true/false"),
}

# A field without a range entry still gets its annotation's type checked.
_BY_TYPE: dict[Any, tuple[Callable[[Any], bool], str]] = {
    int: (_is_int, "an integer"),
    float: (_is_num, "a number"),
    bool: (lambda v: isinstance(v, bool), "true/false"),
    float | None: (lambda v: v is None or _is_num(v), "null or a number"),
}


def _validate(opts: Any) -> None:
    """Turn list fields into tuples (the record stays hashable) and check every field's range."""
    hints = get_type_hints(type(opts))
    for f in fields(opts):
        given = v = getattr(opts, f.name)
        if isinstance(v, list):
            v = tuple(v)
            object.__setattr__(opts, f.name, v)
        choices = get_args(hints[f.name]) if get_origin(hints[f.name]) is Literal else ()
        if choices and v not in choices:
            raise OptionError(f.name, f"one of {choices}", given)
        ok, expected = _RANGES.get(f.name) or _BY_TYPE.get(hints[f.name], (lambda _: True, ""))
        try:
            good = ok(v)
        except TypeError:  # e.g. betas given as a number
            good = False
        if not good:
            raise OptionError(f.name, expected, given)


@dataclass(frozen=True)
class PretrainOptions:
    """``<profile>.pretrain``: L1 pretraining of the generator (report Eq. 3)."""

    seed: int  # seeds initialisation, patches and noise; ours
    batch_size: int  # global batch, patches (split over the DDP ranks); report: 64
    lr_patch: int  # LR patch side, px (HR = 4x); report: 48
    lr: float  # Adam learning rate; authors option.py default: 1e-4
    betas: tuple[float, float]  # Adam (beta1, beta2); authors option.py default: (0.9, 0.999)
    epochs: int  # length, epochs of iters_per_epoch steps; ours (report: "10 hours of pre-training")
    iters_per_epoch: int  # steps per epoch; authors: 1000 (EDSR loader, --test_every)
    milestones: tuple[int, ...]  # epochs after which lr is multiplied by lr_gamma; authors option.py: 200
    lr_gamma: float  # learning-rate factor per milestone; authors option.py: 0.5
    noise: bool  # inject noise while pretraining; authors: true; false (scales frozen at 0) is ours
    ckpt_every: int  # steps between checkpoints (also written at the end); ours
    log_every: int  # steps per losses.csv row / MLflow log / progress line; ours
    workers: int  # DataLoader worker processes (0: load in the training process); ours
    max_bad_steps: int  # consecutive non-finite steps before the stage stops; ours
    amp: bool  # bf16 autocast, CUDA only (losses stay float32); ours
    channels_last: bool  # NHWC models and batches, CUDA only; ours
    compile: bool  # torch.compile the generator, CUDA only; ours

    def __post_init__(self) -> None:
        _validate(self)


@dataclass(frozen=True)
class GanOptions:
    """``<profile>.train_gan``: MAP-GAN training, fidelity + relativistic adversarial, R1 critic (report Eqs. 4-7)."""

    seed: int  # seeds the critic's initialisation, patches and noise; ours
    batch_size: int  # global batch, patches, even: one half trains the critic, the other G; report: 64 = 2 x 32
    lr_patch: int  # LR patch side, px (HR = 4x = the critic's input); report: 48
    lr_g: float  # Adam learning rate of G; authors demo.sh --lr: 2e-5
    lr_d: float  # Adam learning rate of the critic; authors demo.sh --d_lr: 2e-5
    betas: tuple[float, float]  # Adam (beta1, beta2) of both; authors demo.sh --betas: (0.9, 0.99)
    alpha: float  # fidelity weight, [0,1] image units; authors 10 (0-255 units) = 2550 (docs/training.md)
    r1_gamma: float  # R1 weight, [0,1] units, loss += 0.5*r1_gamma*E|grad C|^2; authors 10 (0-255) = 10/255**2
    adv_loss: Literal["softplus", "hinge"]  # relativistic loss; authors: softplus (BCE with logits); hinge is ours
    ema_beta: float  # EMA of G, updated every step; authors demo.sh --ema_beta: 0.999
    noise_init: float | None  # noise scales set at the start, 0-255 units; null keeps them (authors); a number: ours
    epochs: int  # length, epochs of iters_per_epoch steps; report: 200
    iters_per_epoch: int  # steps per epoch; authors: 1000 (EDSR loader, --test_every)
    milestones: tuple[int, ...]  # epochs after which both lrs are multiplied by lr_gamma; authors option.py: 200
    lr_gamma: float  # learning-rate factor per milestone; authors option.py: 0.5
    image_every: int  # steps between monitoring grids; ours (report: every 10th batch)
    ckpt_every: int  # steps between checkpoints (also written at the end); ours
    log_every: int  # steps per losses.csv row / MLflow log / progress line; ours
    workers: int  # DataLoader worker processes (0: load in the training process); ours
    max_bad_steps: int  # consecutive steps with a non-finite loss before the stage stops; ours
    amp: bool  # bf16 autocast, CUDA only (critic head, losses and R1 stay float32); ours
    channels_last: bool  # NHWC models and batches, CUDA only; ours
    compile: bool  # torch.compile G, CUDA only (never the critic: R1 needs a double backward); ours

    def __post_init__(self) -> None:
        _validate(self)
        if self.batch_size % 2:
            raise OptionError("batch_size", "an even number (one half trains the critic, the other G)",
                              self.batch_size)
