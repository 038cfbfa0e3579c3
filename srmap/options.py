"""Every hyper-parameter of the networks and the two training stages: one frozen dataclass per params section.

:class:`GeneratorConfig` and :class:`CriticConfig` are ``<profile>.model.generator`` /
``.critic``; :class:`PretrainOptions` is ``<profile>.pretrain`` and
:class:`GanOptions` is ``<profile>.train_gan``. Each field's comment gives its
unit and the source of the paper profile's value: the report, the authors' code
(``r-mohanty/Super-Rez``: ``src/model/NetworksV2.py``, ``src/loss/Main.py``,
``src/option.py``, ``src/demo.sh``, ``src/trainer.py``) or ours (docs/model.md and
docs/training.md have the tables). ``srmap.config`` derives the params.yaml schema
(names and types) from these fields, and a value out of range raises
:class:`OptionError` when the record is built, so a new hyper-parameter is one
field here and one line per profile in params.yaml.

Torch-free: the Snakefile imports srmap.config, which imports this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Literal, Mapping, get_args, get_origin, get_type_hints

SCALE = 4  # the only magnification: generator, training, evaluation and report are built for x4
# How an output is made consistent with its LR input: "none", or "project" (srmap.resize.project_consistent_box)
CONSISTENCY = ("none", "project")
PROJECTED = ("_projected", " + projection")  # slug suffix and label suffix of a Table 2 row made with "project"
# The losses each training stage logs (losses.csv columns after step and epoch; Figure 4 plots them).
LOSSES = {"pretrain": ("l1",), "train_gan": ("fidelity", "generator", "critic", "r1")}


class OptionError(ValueError):
    """A hyper-parameter out of range; ``key`` names the field, ``expected`` says what it must be."""

    def __init__(self, key: str, expected: str, value: Any, message: str | None = None):
        super().__init__(message or f"{key}: expected {expected}, got {value!r}")
        self.key, self.expected, self.value = key, expected, value


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _pos_ints(v: Any) -> bool:
    return len(v) >= 1 and all(_is_int(x) and x >= 1 for x in v)


# Range of each field, whichever record has it: (test, what the value must be).
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    # networks
    "stem_width": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "feature_widths": (lambda v: len(v) == 3 and _pos_ints(v), "3 positive integers (LR, x2, x4)"),
    "blocks_per_stage": (_pos_ints, "a non-empty list of positive integers"),
    "stage_widths": (_pos_ints, "a non-empty list of positive integers"),
    "compression": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "kernel_size": (lambda v: _is_int(v) and v >= 1 and v % 2 == 1, "an odd positive integer ('same' padding)"),
    "basis_size": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "epilog_width": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "latent_width": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    # training
    "seed": (lambda v: _is_int(v) and 0 <= v < 2**31, "an integer in [0, 2**31)"),
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
    "epochs": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "iters_per_epoch": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "milestones": (lambda v: all(_is_int(m) and m >= 1 for m in v), "positive epoch numbers"),
    "lr_gamma": (lambda v: _is_num(v) and v > 0, "a number > 0"),
    "image_every": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "ckpt_every": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "log_every": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "workers": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "max_bad_steps": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "fidelity_border": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (LR pixels)"),
}

# A field without a range entry still gets its annotation's type checked.
_BY_TYPE: dict[Any, tuple[Callable[[Any], bool], str]] = {
    int: (_is_int, "an integer"),
    float: (_is_num, "a number"),
    bool: (lambda v: isinstance(v, bool), "true/false"),
    float | None: (lambda v: v is None or _is_num(v), "null or a number"),
}


def _validate(record: Any) -> None:
    """Turn list fields into tuples (the record stays hashable) and check every field's range."""
    hints = get_type_hints(type(record))
    for f in fields(record):
        given = v = getattr(record, f.name)
        if isinstance(v, list):
            v = tuple(v)
        hint = hints[f.name]
        if (hint is float or hint == float | None) and _is_int(v):
            v = float(v)  # 0 for 0.0: torch's optimisers insist on floats
        elif get_origin(hint) is tuple and get_args(hint)[:1] == (float,) and isinstance(v, tuple):
            v = tuple(float(x) if _is_int(x) else x for x in v)
        if v is not given:
            object.__setattr__(record, f.name, v)
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


def _check_inner(widths: tuple[int, ...], compression: int) -> None:
    narrow = [w for w in widths if w < compression]
    if narrow:
        raise OptionError("compression", f"at most the narrowest block width {narrow[0]} (inner width = "
                                         f"width // compression)", compression)


def from_params(cls: type, section: Any, where: str):
    """Build record ``cls`` from a params.yaml mapping: every field required, nothing else allowed.

    Raises OptionError whose ``key`` is ``where.<field>`` for an unknown,
    missing or out-of-range key (``where`` e.g. ``model.generator``).
    """
    if not isinstance(section, Mapping):
        raise OptionError(where, f"a mapping of {cls.__name__} keys", section)
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(section) - set(names), key=str)
    if unknown:
        raise OptionError(f"{where}.{unknown[0]}", f"one of {', '.join(names)}", unknown[0],
                          f"{where}: unknown key {unknown[0]!r} (expected keys: {', '.join(names)})")
    missing = [n for n in names if n not in section]
    if missing:
        raise OptionError(f"{where}.{missing[0]}", "a value", None, f"{where}: missing key {missing[0]!r}")
    try:
        return cls(**section)
    except OptionError as exc:
        raise OptionError(f"{where}.{exc.key}", exc.expected, exc.value) from None


# ---------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GeneratorConfig:
    """``<profile>.model.generator``; defaults = report Table 1 = the authors' x4 ``Generator``."""

    stem_width: int = 256  # trunk channels at LR; report Table 1 "Stem Width"
    feature_widths: tuple[int, ...] = (512, 256, 128)  # aggregated features at LR, x2, x4; report "Feature Widths"
    blocks_per_stage: tuple[int, ...] = (16, 16, 16, 16)  # residual blocks per stage; report appendix: 4 x 16
    compression: int = 4  # block inner width = width // compression; report "Compression Factor"
    kernel_size: int = 3  # kernel of every 3x3 conv; report "Receptive Field"

    def __post_init__(self) -> None:
        _validate(self)
        _check_inner((self.stem_width,) + self.feature_widths[:2], self.compression)

    @property
    def scale(self) -> int:
        """Magnification: one x2 upsample block per feature width after the first (always :data:`SCALE`)."""
        return 2 ** (len(self.feature_widths) - 1)


@dataclass(frozen=True)
class CriticConfig:
    """``<profile>.model.critic``; defaults = the critic the authors' ``src/loss/Main.py`` builds."""

    basis_size: int = 3  # side of the last feature map, reduced by a global depthwise conv; authors: 3
    stage_widths: tuple[int, ...] = (256, 256, 512, 512, 512, 1024)  # input width of each x2-down stage; authors
    blocks_per_stage: tuple[int, ...] = (1, 1, 2, 2, 2, 1)  # blocks per stage, the first one downsamples; authors
    epilog_width: int = 1024  # output width of the last stage; authors
    latent_width: int = 512  # hidden units of the fully connected head; authors
    compression: int = 4  # block inner width = width // compression; authors
    kernel_size: int = 3  # kernel of every 3x3 conv; authors

    def __post_init__(self) -> None:
        _validate(self)
        if len(self.blocks_per_stage) != len(self.stage_widths):
            raise OptionError("blocks_per_stage", f"{len(self.stage_widths)} entries (one per stage_widths entry)",
                              list(self.blocks_per_stage))
        _check_inner(self.stage_widths[1:] + (self.epilog_width,), self.compression)

    @property
    def in_size(self) -> int:
        """Side of the square HR patches it scores: basis_size x 2**stages (paper: 3 x 64 = 192)."""
        return self.basis_size * 2 ** len(self.stage_widths)


# ---------------------------------------------------------------------------
# Training stages
# ---------------------------------------------------------------------------


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
    ckpt_every: int  # steps between checkpoints (also written at the end and on a stop signal); ours
    log_every: int  # steps per losses.csv row / MLflow log / progress line; ours
    workers: int  # DataLoader worker processes (0: load in the training process); ours
    max_bad_steps: int  # consecutive non-finite steps before the stage stops; ours
    amp: bool  # bf16 autocast on CUDA and CPU (losses stay float32); ours
    channels_last: bool  # NHWC models and batches, CUDA and CPU; ours
    compile: bool  # torch.compile of G's training step (inductor), CUDA and CPU; ours

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
    fidelity_border: int  # LR pixels at each patch edge left out of the fidelity term; ours: 2 (authors: 0)
    fidelity_clamp: bool  # fidelity on clamp(G(y), 0, 1), straight-through gradient; ours (authors: false)
    fidelity_context: bool  # supervise the border band with 8 px of true HR context around the patch; ours (needs
    #                         fidelity_border 0 and consistency none)
    consistency: Literal["none", "project"]  # project G(y) onto {x : D x = y} before losses; ours (authors: none)
    epochs: int  # length, epochs of iters_per_epoch steps; report: 200
    iters_per_epoch: int  # steps per epoch; authors: 1000 (EDSR loader, --test_every)
    milestones: tuple[int, ...]  # epochs after which both lrs are multiplied by lr_gamma; authors option.py: 200
    lr_gamma: float  # learning-rate factor per milestone; authors option.py: 0.5
    image_every: int  # steps between monitoring grids, plus one at the last step; ours (report: every 10th batch)
    ckpt_every: int  # steps between checkpoints (also written at the end and on a stop signal); ours
    log_every: int  # steps per losses.csv row / MLflow log / progress line; ours
    workers: int  # DataLoader worker processes (0: load in the training process); ours
    max_bad_steps: int  # consecutive steps with a non-finite loss before the stage stops; ours
    amp: bool  # bf16 autocast on CUDA and CPU (critic head, losses and R1 stay float32); ours
    channels_last: bool  # NHWC models and batches, CUDA and CPU; ours
    compile: bool  # torch.compile of G's step and the critic's scoring passes (R1 stays eager); ours

    def __post_init__(self) -> None:
        _validate(self)
        if self.batch_size % 2:
            raise OptionError("batch_size", "an even number (one half trains the critic, the other G)",
                              self.batch_size)
        if 2 * self.fidelity_border >= self.lr_patch:
            raise OptionError("fidelity_border", f"less than half of lr_patch ({self.lr_patch})",
                              self.fidelity_border)
        if self.fidelity_context and self.fidelity_border:
            raise OptionError("fidelity_border", "0 with fidelity_context: true (the context supervises the band)",
                              self.fidelity_border)
        if self.fidelity_context and self.consistency != "none":
            raise OptionError("consistency", "none with fidelity_context: true (a projection that reads the HR "
                                             "context is not built)", self.consistency)
