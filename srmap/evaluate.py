"""Scoring SR outputs with the NTIRE 2021 protocol, and the pipeline's `evaluate` stage.

Per image: LPIPS (mean over samples of each sample's mean spatial map),
LR-PSNR mean and worst over samples, the diversity score, and BasicSR
PSNR/SSIM against the HR image in RGB and Y, each the mean over samples.
Dataset numbers are plain means of the per-image values, as in the official
script. PSNR/SSIM use the same NTIRE-cropped pair (GT cropped to a multiple
of 8), then shave ``crop_border``.

Two folder layouts are read:

* challenge: GT ``0801.png`` ...; SR ``000000_sample00000.png`` (or
  ``000000.png`` for one sample), the index being the GT's position in
  sorted order;
* simple: SR ``<gt-stem>_s<k>.png``, k = 0..samples-1, or for one output
  ``<gt-stem>.png`` (``<gt-stem>_x4.png``, as `srmap upscale` names it, is
  accepted too).
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from srmap.imageio import read_rgb8, write_png
from srmap.metrics import LPIPS, FidelityReference, diversity_score, lpips_of_maps, lr_psnr_to, ntire_crop
from srmap.options import CONSISTENCY, SCALE
from srmap.utils import atomic_path

if TYPE_CHECKING:
    import pandas as pd

COLUMNS = ["image", "LPIPS_mean", "LRPSNR_mean", "LRPSNR_worst", "score", "PSNR", "SSIM", "PSNR_Y", "SSIM_Y",
           "LRPSNR_inner"]
LR_SHAVE = 2  # LR pixels left out at each side for LRPSNR_inner: the band training's fidelity term skips (ours)
# Dataset metric names (metrics.json leaves, MLflow keys) and the per-image column each is the mean of; the
# CSV keeps the NTIRE measure.py / BasicSR names. 'samples' and 'images' complete a method's metrics.
METRICS = {"lpips": "LPIPS_mean", "lr_psnr": "LRPSNR_mean", "lr_psnr_worst": "LRPSNR_worst", "diversity": "score",
           "psnr": "PSNR", "ssim": "SSIM", "psnr_y": "PSNR_Y", "ssim_y": "SSIM_Y", "lr_psnr_inner": "LRPSNR_inner"}
_SLUG = re.compile(r"[a-z0-9_]+")


@dataclass(frozen=True)
class Method:
    """One row of Table 2: how its SR outputs are made and what it is called."""

    slug: str  # identity: metrics.json key, MLflow prefix, folder/CSV name; [a-z0-9_]+
    label: str  # display label in Table 2 and the figures; never decides behaviour
    checkpoint: Path | None = None  # any x4 checkpoint srmap.loaders.load_sr_model reads; None = MATLAB bicubic
    samples: int = 1  # SR outputs per LR image: 1 = deterministic (noise off), N > 1 = seeds 0..N-1
    sr_dir: Path | None = None  # released SR images to score as they are (no checkpoint): NTIRE or _s<k> layout
    consistency: str = "none"  # "project": every output mapped onto the images whose bicubic x1/4 is the LR input

    def __post_init__(self):
        if not _SLUG.fullmatch(self.slug):
            raise ValueError(f"method slug {self.slug!r}: expected lower-case letters, digits and '_'")
        if self.samples < 1:
            raise ValueError(f"method {self.slug!r}: samples must be >= 1, got {self.samples}")
        if self.checkpoint is not None and self.sr_dir is not None:
            raise ValueError(f"method {self.slug!r}: give a checkpoint or a folder of SR images, not both")
        if self.checkpoint is None and self.sr_dir is None and self.samples != 1:
            raise ValueError(f"method {self.slug!r}: bicubic is deterministic, samples must be 1")
        if self.consistency not in CONSISTENCY:
            raise ValueError(f"method {self.slug!r}: consistency must be one of {', '.join(CONSISTENCY)}, "
                             f"got {self.consistency!r}")
        if self.consistency != "none" and self.sr_dir is not None:
            raise ValueError(f"method {self.slug!r}: released SR images are scored as they are (consistency none)")


def _gt_files(gt_dir: Path) -> list[Path]:
    if not gt_dir.is_dir():
        raise FileNotFoundError(f"{gt_dir}: GT folder not found")
    files = sorted(p for p in gt_dir.iterdir() if p.suffix.lower() == ".png" and p.is_file())
    if not files:
        raise FileNotFoundError(f"{gt_dir}: no .png GT images")
    return files


def _challenge_names(index: int, samples: int) -> list[str]:
    return [f"{index:06d}.png"] if samples == 1 else [f"{index:06d}_sample{k:05d}.png" for k in range(samples)]


def _simple_names(stem: str, samples: int, scale: int, sr_dir: Path) -> list[str]:
    if samples > 1:
        return [f"{stem}_s{k}.png" for k in range(samples)]
    for name in (f"{stem}.png", f"{stem}_x{scale}.png"):
        if (sr_dir / name).is_file():
            return [name]
    return [f"{stem}.png"]


def find_samples(gt_dir, sr_dir, samples: int, *, scale: int = SCALE) -> dict[str, list[Path]]:
    """Map each GT image path (str, sorted) to its ``samples`` SR files (challenge or simple layout).

    The layout is the challenge one when the first GT's challenge-named file
    exists in ``sr_dir``, else the simple one. Extra SR files are ignored; a
    missing one raises FileNotFoundError naming it and how many are missing.
    """
    gt_dir, sr_dir = Path(gt_dir), Path(sr_dir)
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    gts = _gt_files(gt_dir)
    if not sr_dir.is_dir():
        raise FileNotFoundError(f"{sr_dir}: SR folder not found")
    challenge = (sr_dir / _challenge_names(0, samples)[0]).is_file()
    found: dict[str, list[Path]] = {}
    missing: list[Path] = []
    for index, gt in enumerate(gts):
        names = _challenge_names(index, samples) if challenge else _simple_names(gt.stem, samples, scale, sr_dir)
        paths = [sr_dir / n for n in names]
        missing += [p for p in paths if not p.is_file()]
        found[str(gt)] = paths
    if missing:
        layout = "challenge (000000_sample00000.png)" if challenge else "simple (<gt-stem>_s<k>.png / <gt-stem>.png)"
        raise FileNotFoundError(f"{missing[0]}: SR file not found ({len(missing)} missing in {sr_dir}, "
                                f"{layout} layout, {samples} sample(s) per GT image)")
    return found


def ntire_scores(gt_uint8: np.ndarray, samples_uint8: Sequence[np.ndarray], lpips: LPIPS, *,
                 scale: int = SCALE) -> dict[str, float]:
    """The official NTIRE 2021 numbers for one image: LPIPS_mean, LRPSNR_mean, LRPSNR_worst, score.

    Takes the uint8 HxWx3 GT and its SR samples (any size >= the GT cropped to
    a multiple of 8). The GT's LPIPS features and its downscaled copy are
    computed once for all samples. Also LRPSNR_inner (ours, not NTIRE's): the
    mean LR-PSNR with ``LR_SHAVE`` LR pixels left out at every side (a GT that
    passes ``check_pair`` is large enough; a smaller one raises ValueError).
    """
    from srmap.resize import imresize

    pairs = [ntire_crop(gt_uint8, s) for s in samples_uint8]
    gt = pairs[0][0]
    srs = [np.ascontiguousarray(sr) for _, sr in pairs]
    maps = lpips.spatial_maps(np.ascontiguousarray(gt), srs)  # (S, H, W)
    gt_lr = imresize(np.ascontiguousarray(gt), 1.0 / scale, rounding="half_even")
    lr = [lr_psnr_to(sr, gt_lr, scale=scale) for sr in srs]
    inner = float(np.mean([lr_psnr_to(sr, gt_lr, scale=scale, lr_shave=LR_SHAVE) for sr in srs]))
    return {"LPIPS_mean": float(np.mean(lpips_of_maps(maps))), "LRPSNR_mean": float(np.mean(lr)),
            "LRPSNR_worst": float(np.min(lr)), "score": diversity_score(maps), "LRPSNR_inner": inner}


def fidelity_scores(gt_uint8: np.ndarray, samples_uint8: Sequence[np.ndarray], *,
                    crop_border: int = 4) -> dict[str, float]:
    """BasicSR PSNR/SSIM (RGB and Y) against the GT, each the mean over samples, on the NTIRE-cropped pair.

    Takes uint8 HxWx3 arrays; returns PSNR, SSIM, PSNR_Y, SSIM_Y (dB / [-1, 1];
    PSNR inf for an exact copy).
    """
    pairs = [ntire_crop(gt_uint8, s) for s in samples_uint8]
    ref = FidelityReference(np.ascontiguousarray(pairs[0][0]), crop_border=crop_border)
    rows = [ref.scores(np.ascontiguousarray(sr)) for _, sr in pairs]
    return {k: float(np.mean([r[k] for r in rows])) for k in ("PSNR", "SSIM", "PSNR_Y", "SSIM_Y")}


def score_image(gt_uint8: np.ndarray, samples_uint8: list, lpips: LPIPS, *, crop_border: int = 4,
                scale: int = SCALE) -> dict[str, float]:
    """All per-image numbers: LPIPS_mean, LRPSNR_mean, LRPSNR_worst, score, PSNR, SSIM, PSNR_Y, SSIM_Y, LRPSNR_inner.

    Takes the uint8 HxWx3 RGB GT and a non-empty list of its uint8 SR samples.
    """
    if len(samples_uint8) == 0:
        raise ValueError("score_image needs at least one SR sample")
    return {**ntire_scores(gt_uint8, samples_uint8, lpips, scale=scale),
            **fidelity_scores(gt_uint8, samples_uint8, crop_border=crop_border)}


LPIPS_MIN_SIDE = 32  # the smallest input side LPIPS's AlexNet takes (its 5 conv/pool stages)


def check_pair(gt_path: Path, gt_shape: tuple, sr_path: Path, sr_shape: tuple) -> None:
    """Refuse, naming both files, an SR that is not its GT's size up to the protocol's crop, or a too-small GT.

    The NTIRE 2021 protocol crops the GT (H, W) top-left to multiples of 8;
    an SR may therefore be from (H//8*8, W//8*8) up to (H, W) pixels. A GT
    whose cropped size has a side under ``LPIPS_MIN_SIDE`` cannot be scored.
    Raises ValueError (one line).
    """
    h, w = gt_shape[:2]
    h8, w8 = h // 8 * 8, w // 8 * 8
    if min(h8, w8) < LPIPS_MIN_SIDE:
        raise ValueError(f"{gt_path}: GT is {h}x{w} (HxW), {h8}x{w8} after the protocol's crop to a multiple of 8; "
                         f"LPIPS needs at least {LPIPS_MIN_SIDE} px per side")
    H, W = sr_shape[:2]
    if not (h8 <= H <= h and w8 <= W <= w):
        raise ValueError(f"{sr_path}: SR is {H}x{W} (HxW) but its GT {gt_path} is {h}x{w}; expected the GT's "
                         f"size (at least {h8}x{w8}, the protocol's crop to a multiple of 8)")


def _score_dirs(gt_dir: Path, sr_dir: Path, samples: int, scale: int, lpips: LPIPS, crop_border: int,
                progress: bool, desc: str = "evaluate") -> "pd.DataFrame":
    import pandas as pd
    from tqdm import tqdm

    found = find_samples(gt_dir, sr_dir, samples, scale=scale)
    rows = []
    for gt_path, sr_paths in tqdm(found.items(), desc=desc, unit="img", disable=not progress, file=sys.stderr):
        gt = read_rgb8(gt_path)
        srs = [read_rgb8(p) for p in sr_paths]
        for p, sr in zip(sr_paths, srs):
            check_pair(Path(gt_path), gt.shape, p, sr.shape)
        scores = score_image(gt, srs, lpips, crop_border=crop_border, scale=scale)
        rows.append({"image": Path(gt_path).stem, **scores})
    return pd.DataFrame(rows, columns=COLUMNS)


def evaluate_dirs(gt_dir, sr_dir, *, samples: int = 10, scale: int = SCALE, lpips_pretrained: bool = True,
                  device: str = "cpu", crop_border: int = 4, progress: bool = True) -> "pd.DataFrame":
    """Score every GT image in ``gt_dir`` against its SR samples in ``sr_dir``; one DataFrame row per image.

    Columns: image (GT stem), LPIPS_mean, LRPSNR_mean, LRPSNR_worst, score,
    PSNR, SSIM, PSNR_Y, SSIM_Y, LRPSNR_inner (LR-PSNR with ``LR_SHAVE`` LR pixels shaved; ours).
    """
    lpips = LPIPS(pretrained=lpips_pretrained, device=device)
    return _score_dirs(Path(gt_dir), Path(sr_dir), samples, scale, lpips, crop_border, progress)


def summarize(df: "pd.DataFrame") -> dict[str, float]:
    """Dataset metrics: the plain mean of each per-image column under its METRICS name, plus 'images'.

    Keys: lpips, lr_psnr, lr_psnr_worst, diversity, psnr, ssim, psnr_y, ssim_y,
    lr_psnr_inner (floats; an inf PSNR makes its mean inf) and images (int).
    """
    if len(df) == 0:
        raise ValueError("summarize: no per-image rows")
    out: dict[str, float] = {k: float(df[col].astype(float).mean()) for k, col in METRICS.items()}
    out["images"] = int(len(df))
    return out


def write_csv(df: "pd.DataFrame", path: Path) -> None:
    """Write per-image scores as CSV atomically (inf written as 'inf')."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6f")


def _format_summary(summary: dict) -> str:
    return ", ".join(f"{k}: {v:.4f}" if isinstance(v, float) and math.isfinite(v) else f"{k}: {v}"
                     for k, v in summary.items())


def evaluate_command(gt, sr, samples, scale, out_csv, lpips_pretrained, device, *, crop_border: int = 4) -> int:
    """What `srmap evaluate` runs: score ``sr`` against ``gt``, write per-image CSV atomically, print the means.

    Returns 0 on success, 2 with one line on stderr for bad input (missing
    files or weights, mismatched sizes).
    """
    try:
        lpips = LPIPS(pretrained=lpips_pretrained, device=device)
        df = _score_dirs(Path(gt), Path(sr), int(samples), int(scale), lpips, crop_border, True)
    except (FileNotFoundError, ValueError) as exc:
        print(f"srmap evaluate: {exc}", file=sys.stderr)
        return 2
    write_csv(df, Path(out_csv))
    print(f"LPIPS weights: {lpips.weights}; device {device}")
    print(_format_summary(summarize(df)))
    print(f"per-image scores: {out_csv}")
    return 0


def log_scores(tracker, metrics: dict, lpips_weights: str, metrics_file: Path) -> None:
    """Log a scoring stage's Table 2 rows to ``tracker`` (a :class:`srmap.tracking.Tracker`): ``{slug: {metric:
    number}}`` as metrics ``<slug>/<metric>``, the LPIPS weight source as the tag ``lpips_weights``, and the
    DVC metrics file as an artifact."""
    tracker.log_metrics({f"{slug}/{k}": v for slug, leaves in metrics.items() for k, v in leaves.items()})
    tracker.set_tags({"lpips_weights": lpips_weights})
    tracker.log_artifact(metrics_file)


def _generate(method: Method, lr_files: list[Path], sr_dir: Path, *, noise_scale: float, tile: int,
              tile_pad: int, device: str) -> None:
    """Write each LR image's SR output(s): <stem>.png, or <stem>_s<k>.png for seeds 0..samples-1 at ``noise_scale``.

    Raises ValueError when a deterministic (published) model is asked for more than one sample.
    """
    from tqdm import tqdm

    from srmap.inference import consistent_image, upscale_image
    from srmap.loaders import load_sr_model
    from srmap.resize import imresize

    G = None if method.checkpoint is None else load_sr_model(Path(method.checkpoint), device=device)
    if method.samples > 1 and getattr(G, "deterministic", False):
        raise ValueError(f"method {method.slug!r}: {method.checkpoint} holds a deterministic model; samples must be 1")
    noise = noise_scale if method.samples > 1 else 0.0
    for lr_path in tqdm(lr_files, desc=f"upscale {method.slug}", unit="img", file=sys.stderr):
        lr = read_rgb8(lr_path)
        if G is None and method.consistency == "project":  # bicubic in float, then the same projection
            import torch

            y = torch.tensor(lr, dtype=torch.float64).permute(2, 0, 1)[None] / 255  # a copy: lr is read-only
            write_png(sr_dir / f"{lr_path.stem}.png", consistent_image(imresize(y, float(SCALE)), y))
        elif G is None:
            write_png(sr_dir / f"{lr_path.stem}.png", imresize(lr, SCALE))
        else:
            for k in range(method.samples):
                sr = upscale_image(G, lr, seed=k, noise_scale=noise, tile=tile, tile_pad=tile_pad, device=device,
                                   consistency=method.consistency)
                name = f"{lr_path.stem}.png" if method.samples == 1 else f"{lr_path.stem}_s{k}.png"
                write_png(sr_dir / name, sr)


def _shown_path(path: Path | None) -> str | None:
    """``path`` relative to the working directory when inside it (the project root for a stage), else absolute."""
    if path is None:
        return None
    path = Path(path).resolve()
    try:
        return path.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def _check_valid_dir(valid_dir: Path) -> list[Path]:
    hr = _gt_files(valid_dir / "hr")
    lr_files = [valid_dir / "lr" / p.name for p in hr]
    missing = [p for p in lr_files if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: LR image not found ({len(missing)} of {len(hr)} missing; "
                                f"expected lr/<stem>.png for every hr/<stem>.png)")
    return lr_files


def evaluate_stage(*, valid_dir: Path, methods: Sequence[Method], out_dir: Path, noise_scale: float,
                   crop_border: int, lpips_pretrained: bool, tile: int, tile_pad: int,
                   device: str | None = None) -> tuple[dict, dict]:
    """Upscale the validation set with every method and score it; returns ``(metrics, info)``.

    ``valid_dir`` holds hr/<stem>.png and lr/<stem>.png. Each Method with
    ``samples`` > 1 gets seeds 0..samples-1 at ``noise_scale``; one output
    runs with noise off; a Method with ``sr_dir`` is scored from that folder
    as it is. Writes out_dir/sr/<slug>/<stem>_s<k>.png (or <stem>.png),
    out_dir/<slug>.csv and out_dir/methods.json (= ``info``).
    ``metrics`` is {slug: {lpips, lr_psnr, lr_psnr_worst, diversity, psnr,
    ssim, psnr_y, ssim_y, lr_psnr_inner, samples, images}}, numbers only (DVC's metrics
    file); ``info`` holds what is not a number: {"lpips": {"pretrained",
    "weights"}, "methods": [{"slug", "label", "samples", "checkpoint", "sr_dir"}]}.
    """
    from srmap.utils import atomic_write_json, pick_device

    valid_dir, out_dir = Path(valid_dir), Path(out_dir)
    slugs = [m.slug for m in methods]
    if not methods or len(set(slugs)) != len(slugs):
        raise ValueError(f"methods: expected one or more distinct slugs, got {slugs}")
    device = pick_device(device)
    lr_files = _check_valid_dir(valid_dir)
    lpips = LPIPS(pretrained=lpips_pretrained, device=device)
    metrics = {}
    for method in methods:
        if method.sr_dir is not None:  # released results: scored where they are
            sr_dir = Path(method.sr_dir)
        else:
            sr_dir = out_dir / "sr" / method.slug
            _generate(method, lr_files, sr_dir, noise_scale=noise_scale, tile=tile, tile_pad=tile_pad,
                      device=device)
        df = _score_dirs(valid_dir / "hr", sr_dir, method.samples, SCALE, lpips, crop_border, True,
                         desc=f"score {method.slug}")
        write_csv(df, out_dir / f"{method.slug}.csv")
        summary = summarize(df)
        metrics[method.slug] = {**{k: summary[k] for k in METRICS}, "samples": method.samples,
                                "images": summary["images"]}
    info = {"lpips": {"pretrained": lpips.pretrained, "weights": lpips.weights},
            "methods": [{"slug": m.slug, "label": m.label, "samples": m.samples, "consistency": m.consistency,
                         "checkpoint": _shown_path(m.checkpoint), "sr_dir": _shown_path(m.sr_dir)}
                        for m in methods]}
    atomic_write_json(out_dir / "methods.json", info)
    return metrics, info
