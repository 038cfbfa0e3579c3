"""Upscaling with a trained generator or a published model: tiled inference and the `srmap upscale` command.

Tiling splits the LR image into ``tile`` x ``tile`` blocks, runs each with
``tile_pad`` LR pixels of context on every side (clipped at the image border)
and keeps only the block's own output. The generator's noise is a pure
function of (seed, layer, global LR position) and each tile is told its
``origin``, so with ``tile_pad >= G.receptive_radius`` the stitched result
equals the whole-image result up to float rounding; peak memory then grows
with the tile, not with the image.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from srmap.imageio import IMAGE_SUFFIXES, read_image, save_png
from srmap.options import CONSISTENCY, SCALE
from srmap.utils import atomic_path, stale_temporaries

if TYPE_CHECKING:
    import torch

    from srmap.nets import Generator



def _tile_spans(size: int, tile: int, pad: int) -> list[tuple[int, int, int, int]]:
    """(start, end, ctx_start, ctx_end) of each tile along one axis; the context is clipped to [0, size)."""
    return [(s, min(s + tile, size), max(s - pad, 0), min(s + tile + pad, size)) for s in range(0, size, tile)]


def _check_finite(y: torch.Tensor, where: str) -> None:
    import torch

    if not torch.isfinite(y).all():
        raise ValueError(f"the generator produced NaN or inf {where}; nothing was written (diverged weights or "
                         f"a non-finite input)")


def _tiles(G: Generator, lr: torch.Tensor, *, seed: int | None, noise_scale: float, tile: int,
           tile_pad: int | None):
    """Yield (top, left, y) with ``y`` the SR block whose top-left output pixel is (top, left); see upscale_tensor.

    ``y`` is float (N,3,sh,sw) on ``lr``'s device, checked finite. The whole
    image is one block when ``tile`` is 0 or covers it.
    """
    import torch

    if lr.ndim != 4 or lr.shape[1] != 3:
        raise ValueError(f"upscale expects lr of shape (N,3,h,w), got {tuple(lr.shape)}")
    # a published model may not know its radius (attention windows): its tiles are approximate by nature
    radius = None if G.receptive_radius is None else int(G.receptive_radius)
    if tile_pad is None and radius is None:
        raise ValueError(f"{G} has no known receptive radius; give tile_pad explicitly")
    tile_pad = radius if tile_pad is None else tile_pad
    if tile < 0 or tile_pad < 0:
        raise ValueError(f"tile and tile_pad must be >= 0, got tile={tile}, tile_pad={tile_pad}")
    h, w = lr.shape[-2:]
    with torch.no_grad():
        if tile == 0 or (tile >= h and tile >= w):
            y = G(lr, seed=seed, noise_scale=noise_scale)
            _check_finite(y, "for the image")
            yield 0, 0, y
            return
        if radius is not None and tile_pad < radius:
            warnings.warn(f"tile_pad={tile_pad} is below the generator's receptive radius ({radius} LR pixels): "
                          "tile seams will differ from the whole-image result", stacklevel=3)
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
        for top, bottom, ctop, cbottom in _tile_spans(h, tile, tile_pad):
            for left, right, cleft, cright in _tile_spans(w, tile, tile_pad):
                y = G(lr[..., ctop:cbottom, cleft:cright], seed=seed, noise_scale=noise_scale, origin=(ctop, cleft))
                s = y.shape[-1] // (cright - cleft)  # the generator's scale factor
                y = y[..., (top - ctop) * s:(bottom - ctop) * s, (left - cleft) * s:(right - cleft) * s]
                _check_finite(y, f"in the tile at LR ({top}, {left})")
                yield top * s, left * s, y


def upscale_tensor(G: Generator, lr: torch.Tensor, *, seed: int | None = None, noise_scale: float = 1.0,
                   tile: int = 0, tile_pad: int | None = 16) -> torch.Tensor:
    """Run the generator on ``lr`` float (N,3,h,w) in [0,1]; returns (N,3,4h,4w) float, unclamped, no grad.

    ``tile`` > 0 processes ``tile``-pixel LR blocks with ``tile_pad`` pixels of
    context (None: ``G.receptive_radius``, the smallest exact pad);
    ``tile_pad < G.receptive_radius`` warns, since tiles are then no longer
    exact (a model whose radius is None needs an explicit ``tile_pad``).
    ``seed=None`` draws one seed from torch's global RNG so all tiles of the
    call still share the same noise field. The result is stitched on
    ``lr``'s device; :func:`upscale_image` stitches into a host buffer instead.
    Raises ValueError when any output value is NaN or inf.
    """
    out = None
    for top, left, y in _tiles(G, lr, seed=seed, noise_scale=noise_scale, tile=tile, tile_pad=tile_pad):
        if top == 0 and left == 0 and y.shape[-2:] == (lr.shape[-2] * SCALE, lr.shape[-1] * SCALE):
            return y
        if out is None:
            out = y.new_empty(lr.shape[0], y.shape[1], lr.shape[-2] * SCALE, lr.shape[-1] * SCALE)
        out[..., top:top + y.shape[-2], left:left + y.shape[-1]] = y
    return out


PRECISIONS = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}  # --precision -> autocast dtype


def _check_options(device: str, precision: str, consistency: str) -> None:
    """Raise ValueError (one line) for a precision or consistency this code does not know, or fp16 off CUDA."""
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and torch.device(device).type != "cuda":
        raise ValueError(f"precision fp16 needs a CUDA device, got device={device!r} (use bf16 on the CPU)")
    if consistency not in CONSISTENCY:
        raise ValueError(f"consistency must be one of {', '.join(CONSISTENCY)}, got {consistency!r}")


def consistent_image(sr: torch.Tensor, lr: torch.Tensor, dtype: type = np.uint8) -> np.ndarray:
    """``sr`` float (1,3,4h,4w) mapped onto the images whose MATLAB bicubic x1/4 is ``lr`` (float (1,3,h,w) in
    [0,1]), then clamped, scaled and rounded half-to-even to an HxWx3 array of ``dtype`` (uint8 or uint16).

    :func:`srmap.resize.project_consistent_box` with its default 10 rounds, in float64 on the CPU, so the rounded
    result still downsamples to ``lr`` (LR-PSNR above 60 dB; docs/model.md).
    """
    from srmap.resize import project_consistent_box

    whole = project_consistent_box(sr.double().cpu(), lr.double().cpu())
    out = np.empty((*whole.shape[-2:], 3), dtype=dtype)
    _put(out, 0, 0, whole[0], float(np.iinfo(dtype).max))
    return out


def upscale_image(G: Generator, lr_image: np.ndarray, *, seed: int | None, noise_scale: float, tile: int,
                  tile_pad: int | None, device: str, precision: str = "fp32", consistency: str = "none") -> np.ndarray:
    """Upscale a uint8 or uint16 HxWx3 RGB image; returns (4H)x(4W)x3 of the same dtype.

    The network runs in float on values scaled to [0, 1] (uint16 at full
    precision); each output tile is clamped to [0, 1], scaled to the dtype's
    range, rounded half-to-even and copied into a host buffer as it arrives,
    so with ``tile`` > 0 memory beyond the output buffer grows with the tile,
    not the image. ``G`` must already live on ``device``. ``precision`` is
    ``fp32``, ``bf16`` (bf16 autocast, CPU or CUDA) or ``fp16`` (float16
    autocast, CUDA only); the noise maps stay float32 in every case.
    ``consistency="project"`` stitches the whole float output first and maps it
    to the nearest image whose MATLAB bicubic x1/4 is the input
    (:func:`consistent_image`), so the rounded result downsamples back to the
    input (LR-PSNR above 60 dB); this needs a float64 copy of the output.
    Raises ValueError for a bad input or option, or a non-finite output
    (nothing is returned).
    """
    import torch

    if lr_image.dtype not in (np.uint8, np.uint16) or lr_image.ndim != 3 or lr_image.shape[2] != 3:
        raise ValueError(f"expected a uint8 or uint16 HxWx3 LR image, got {lr_image.dtype} {lr_image.shape}")
    _check_options(device, precision, consistency)
    if not math.isfinite(noise_scale):
        raise ValueError(f"noise_scale must be a finite number, got {noise_scale}")
    peak = float(np.iinfo(lr_image.dtype).max)
    h, w = lr_image.shape[:2]
    lr = torch.from_numpy(lr_image.astype(np.int32 if lr_image.dtype == np.uint16 else np.uint8))  # a copy
    lr = lr.to(device).permute(2, 0, 1)[None].float().div_(peak)
    whole = torch.empty(1, 3, h * SCALE, w * SCALE, dtype=torch.float64) if consistency == "project" else None
    out = np.empty((h * SCALE, w * SCALE, 3), dtype=lr_image.dtype) if whole is None else None
    dtype = PRECISIONS[precision]
    with torch.autocast(torch.device(device).type, dtype=getattr(torch, dtype)) if dtype else contextlib.nullcontext():
        for top, left, y in _tiles(G, lr, seed=seed, noise_scale=noise_scale, tile=tile, tile_pad=tile_pad):
            if whole is not None:
                whole[..., top:top + y.shape[-2], left:left + y.shape[-1]] = y.double().cpu()
            else:
                _put(out, top, left, y[0], peak)
            del y
    return out if whole is None else consistent_image(whole, lr, lr_image.dtype)


def _put(out: np.ndarray, top: int, left: int, block: torch.Tensor, peak: float) -> None:
    """Clamp a float (3, sh, sw) block to [0, 1], scale to ``peak``, round half-to-even, copy into ``out``."""
    import torch

    block = block.float().clamp(0, 1).mul_(peak).round_().permute(1, 2, 0)
    block = block.to(torch.uint8) if peak == 255 else block.to(torch.int32)
    out[top:top + block.shape[0], left:left + block.shape[1]] = block.cpu().numpy()


def upscale_alpha(alpha: np.ndarray) -> np.ndarray:
    """Upscale an HxW uint8/uint16 alpha channel x4 with MATLAB-exact bicubic; returns (4H)x(4W), same dtype.

    The alpha channel is resized apart from the RGB and without noise, as
    Real-ESRGAN's bicubic alpha upsampler does (transparency is a mask, not
    texture). Values are clipped to the dtype's range and rounded half-to-even.
    """
    from srmap.resize import imresize

    peak = float(np.iinfo(alpha.dtype).max)
    up = imresize(alpha.astype(np.float64) / peak, SCALE)
    return np.round(np.clip(up, 0, 1) * peak).astype(alpha.dtype)


def _input_files(inputs: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(image files to upscale, [(path, why it is skipped)]) for a file or a folder ``inputs``.

    In a folder, entries with an image suffix that are not readable files (a
    folder named ``x.png``, a dangling link, a link loop) are skipped with
    their reason, and so are files named like this command's output of another
    input (``coffee_x4.png`` beside ``coffee.png``): the command never reads
    its own outputs. Files without an image suffix are ignored. Raises
    FileNotFoundError when ``inputs`` does not exist.
    """
    if inputs.is_file():
        return [inputs], []
    if not inputs.is_dir():
        raise FileNotFoundError(f"{inputs}: no such file or folder")
    files, skipped = [], []
    for p in sorted(inputs.iterdir()):
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            skipped.append((p, "a folder, not an image file"))
        elif p.is_symlink():
            try:
                p.resolve(strict=True)
                skipped.append((p, "a link to something that is not a regular file"))
            except RuntimeError:  # Python < 3.13 reports a loop this way
                skipped.append((p, "a symbolic link loop"))
            except OSError as exc:
                why = "a symbolic link loop" if exc.errno == errno.ELOOP else f"a dangling link to {os.readlink(p)}"
                skipped.append((p, why))
        else:
            skipped.append((p, "not a regular file"))
    stems = {p.stem for p in files}
    source = {p: m["stem"] for p in files if (m := _OUTPUT_STEM.match(p.stem)) and m["stem"] in stems}
    skipped += [(p, f"named like the output of {stem}.*; srmap upscale never reads its own outputs (rename the "
                    "file to upscale it)") for p, stem in source.items()]
    return [p for p in files if p not in source], skipped


_OUTPUT_STEM = re.compile(rf"^(?P<stem>.+)_(?:x{SCALE}|s\d+)$")  # the stems output_names gives


def output_names(stem: str, samples: int) -> list[str]:
    """File names `upscale_command` writes for one input: ``<stem>_x4.png`` or ``<stem>_s<k>.png`` (k from 0)."""
    return [f"{stem}_x{SCALE}.png"] if samples == 1 else [f"{stem}_s{k}.png" for k in range(samples)]


def _memory_hint(exc: BaseException, tile: int) -> str | None:
    """One line for an out-of-memory failure (CPU allocator or CUDA), with the --tile advice; else None."""
    import torch

    cpu = isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and (
        "DefaultCPUAllocator" in str(exc) or "not enough memory" in str(exc)))
    if not (cpu or isinstance(exc, torch.OutOfMemoryError)):
        return None
    where = "host" if cpu else "GPU"
    advice = f"try a smaller --tile than {tile}" if tile else "try --tile 256 (or smaller) to bound memory"
    return f"out of {where} memory; {advice}"


# Exit statuses of `srmap upscale` (its --help lists them).
EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2


def upscale_command(inputs: Path, out: Path, checkpoint: Path, *, samples: int = 1, seed: int = 0,
                    noise_scale: float = 1.0, tile: int = 0, tile_pad: int | None = None, device: str = "cpu",
                    precision: str = "fp32", overwrite: bool = False, consistency: str = "none") -> int:
    """What `srmap upscale` runs: upscale an image file or every image in a folder into the folder ``out``.

    Sample k uses seed ``seed + k``. Each input is read by
    :func:`srmap.imageio.read_image` (EXIF orientation applied); 16-bit input
    gives a 16-bit PNG, and an alpha channel is upscaled apart
    (:func:`upscale_alpha`) and written back as RGBA. ``consistency`` is
    passed to :func:`upscale_image` (colour channels only). ``tile_pad`` None is the
    model's receptive radius (tiles then equal the whole image). An input is
    skipped, with one line on stderr naming it and why, when it cannot be read
    or upscaled (including a NaN/inf output or running out of memory), when it
    is not a regular file or is named like one of this command's outputs
    (:func:`_input_files`), or when one of its outputs already exists and
    ``overwrite`` is False; nothing is written for a skipped input, and its
    samples are renamed into place only when all of them succeeded. Temporary
    files an interrupted run left for these outputs are removed first.
    Returns 0 when every input was written, 1 when any was skipped, 2 when
    nothing could start (bad checkpoint, missing input, bad arguments,
    ``samples`` > 1 for a deterministic published model). ``checkpoint`` is
    anything :func:`srmap.loaders.load_sr_model` reads: an SRMAP generator or
    training checkpoint, or a published x4 model.
    """
    from tqdm import tqdm

    inputs, out = Path(inputs), Path(out)
    try:
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        if not math.isfinite(noise_scale):
            raise ValueError(f"noise_scale must be a finite number, got {noise_scale}")
        _check_options(device, precision, consistency)
        files, skipped = _input_files(inputs)
        if not files and not skipped:
            raise FileNotFoundError(f"{inputs}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        from srmap.loaders import load_sr_model

        G = load_sr_model(checkpoint, device=device)
        if samples > 1 and getattr(G, "deterministic", False):
            raise ValueError(f"{checkpoint}: a deterministic {G.architecture} model gives one output per image; "
                             f"--samples must be 1, got {samples}")
        if tile and tile_pad is None and G.receptive_radius is None:
            raise ValueError(f"{checkpoint}: the receptive radius of this {G.architecture} model is unknown; "
                             "give --tile-pad explicitly")
    except (FileNotFoundError, ValueError) as exc:
        print(f"srmap upscale: {exc}", file=sys.stderr)
        return EXIT_USAGE
    model = repr(G) if getattr(G, "deterministic", False) else \
        f"SRMAP generator, {sum(p.numel() for p in G.parameters()):,} parameters"
    print(f"srmap upscale: {model} on {device}, precision {precision}", file=sys.stderr)
    for path, why in skipped:
        print(f"srmap upscale: skipped {path}: {why}", file=sys.stderr)
    for name in (n for p in files for n in output_names(p.stem, samples)):  # a killed run's half-written files
        for tmp in stale_temporaries(out / name):
            tmp.unlink(missing_ok=True)
    failed = 0
    seen: dict[str, Path] = {}
    for path in tqdm(files, desc="upscale", unit="img", file=sys.stderr):
        try:
            if path.stem in seen:
                raise ValueError(f"same output name as {seen[path.stem].name}; rename one of them")
            seen[path.stem] = path
            targets = [out / name for name in output_names(path.stem, samples)]
            existing = [t for t in targets if t.exists() or t.is_symlink()]
            if existing and not overwrite:
                raise ValueError(f"{existing[0]} already exists; nothing was written for this input "
                                 "(--overwrite replaces it)")
            img = read_image(path)
            alpha = None if img.alpha is None else upscale_alpha(img.alpha)
            with contextlib.ExitStack() as pending:  # every sample's file is renamed into place only at the end
                for k, target in enumerate(targets):
                    sr = upscale_image(G, img.rgb, seed=seed + k, noise_scale=noise_scale, tile=tile,
                                       tile_pad=tile_pad, device=device, precision=precision,
                                       consistency=consistency)
                    if alpha is not None:
                        sr = np.concatenate([sr, alpha[:, :, None]], axis=2)
                    save_png(pending.enter_context(atomic_path(target)), sr)
                    del sr
        except (OSError, ValueError, RuntimeError, MemoryError) as exc:
            msg = _memory_hint(exc, tile)
            if msg is None and not isinstance(exc, (OSError, ValueError)):
                raise  # a bug, not the user's input
            failed += 1
            msg = msg or str(exc)
            msg = msg if str(path) in msg else f"{path}: {msg}"
            tqdm.write(f"srmap upscale: skipped {msg}", file=sys.stderr)
    bad = failed + len(skipped)
    if bad:
        print(f"srmap upscale: {bad} of {len(files) + len(skipped)} input(s) skipped; the others were written",
              file=sys.stderr)
        return EXIT_SOME_FAILED
    return EXIT_OK
