"""Upscaling with a trained generator: checkpoint loading, tiled inference, the `srmap upscale` command.

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
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from srmap.data import write_png

if TYPE_CHECKING:
    import torch

    from srmap.nets import Generator

SCALE = 4
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as uint8 HxWx3 RGB (grey and palette expanded, alpha dropped as cv2 does).

    Raises FileNotFoundError for a missing file and ValueError naming the file
    for anything PIL cannot decode or for non-8-bit images.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        with Image.open(path) as im:
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                raise ValueError(f"{path}: {im.mode} images are not supported; expected 8-bit RGB/grey/palette")
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as exc:
        raise ValueError(f"{path}: cannot decode image ({exc})") from exc


def load_generator(path: str | Path, device: str = "cpu") -> "Generator":
    """Load a generator for inference from a checkpoint file; returns it in eval mode on ``device``, frozen.

    Accepts a ``srmap-generator/1`` file (keys format, config, state_dict) or
    a training checkpoint (keys gen_config, G). Reads with
    ``torch.load(weights_only=True)``, so a crafted pickle never runs; a bad
    file raises ValueError (missing: FileNotFoundError) naming it.
    """
    from srmap.checkpoint import GENERATOR_FORMAT, load_checkpoint
    from srmap.nets import Generator, generator_config

    path = Path(path)
    ckpt = load_checkpoint(path, map_location="cpu")
    if "format" in ckpt:
        if ckpt["format"] != GENERATOR_FORMAT:
            raise ValueError(f"{path}: format is {ckpt['format']!r}; expected {GENERATOR_FORMAT!r}")
        cfg, state = ckpt.get("config"), ckpt.get("state_dict")
    elif "gen_config" in ckpt and "G" in ckpt:
        cfg, state = ckpt["gen_config"], ckpt["G"]
    else:
        raise ValueError(f"{path}: not a generator checkpoint; expected format {GENERATOR_FORMAT!r} or the keys "
                         f"'gen_config' and 'G', found keys {sorted(map(str, ckpt))}")
    if not isinstance(cfg, dict) or not isinstance(state, dict):
        raise ValueError(f"{path}: generator config and weights must both be dicts")
    # A checkpoint saved from a torch.compile'd module prefixes every key.
    if state and all(k.startswith("_orig_mod.") for k in state):
        state = {k[len("_orig_mod."):]: v for k, v in state.items()}
    try:
        G = Generator(generator_config(cfg))
        G.load_state_dict(state)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path}: weights do not fit the stored generator config: {exc}") from exc
    return G.to(device).eval().requires_grad_(False)


def _tile_spans(size: int, tile: int, pad: int) -> list[tuple[int, int, int, int]]:
    """(start, end, ctx_start, ctx_end) of each tile along one axis; the context is clipped to [0, size)."""
    return [(s, min(s + tile, size), max(s - pad, 0), min(s + tile + pad, size)) for s in range(0, size, tile)]


def upscale_tensor(G: "Generator", lr: "torch.Tensor", *, seed: int | None = None, noise_scale: float = 1.0,
                   tile: int = 0, tile_pad: int | None = 16) -> "torch.Tensor":
    """Run the generator on ``lr`` float (N,3,h,w) in [0,1]; returns (N,3,4h,4w), unclamped, no grad.

    ``tile`` > 0 processes ``tile``-pixel LR blocks with ``tile_pad`` pixels of
    context (None: ``G.receptive_radius``, the smallest exact pad);
    ``tile_pad < G.receptive_radius`` warns, since tiles are then no longer
    exact (a model whose radius is None needs an explicit ``tile_pad``).
    ``seed=None`` draws one seed from torch's global RNG so all tiles of the
    call still share the same noise field.
    """
    import torch

    if lr.ndim != 4 or lr.shape[1] != 3:
        raise ValueError(f"upscale_tensor expects lr of shape (N,3,h,w), got {tuple(lr.shape)}")
    # a published model may not know its radius (attention windows): its tiles are approximate by nature
    radius = None if G.receptive_radius is None else int(G.receptive_radius)
    if tile_pad is None and radius is None:
        raise ValueError(f"{G} has no known receptive radius; give tile_pad explicitly")
    tile_pad = radius if tile_pad is None else tile_pad
    if tile < 0 or tile_pad < 0:
        raise ValueError(f"tile and tile_pad must be >= 0, got tile={tile}, tile_pad={tile_pad}")
    with torch.no_grad():
        h, w = lr.shape[-2:]
        if tile == 0 or (tile >= h and tile >= w):
            return G(lr, seed=seed, noise_scale=noise_scale)
        if radius is not None and tile_pad < radius:
            warnings.warn(f"tile_pad={tile_pad} is below the generator's receptive radius ({radius} LR pixels): "
                          "tile seams will differ from the whole-image result", stacklevel=2)
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
        out = None
        for top, bottom, ctop, cbottom in _tile_spans(h, tile, tile_pad):
            for left, right, cleft, cright in _tile_spans(w, tile, tile_pad):
                y = G(lr[..., ctop:cbottom, cleft:cright], seed=seed, noise_scale=noise_scale, origin=(ctop, cleft))
                s = y.shape[-1] // (cright - cleft)  # the generator's scale factor
                if out is None:
                    out = y.new_empty(lr.shape[0], y.shape[1], h * s, w * s)
                out[..., top * s:bottom * s, left * s:right * s] = \
                    y[..., (top - ctop) * s:(bottom - ctop) * s, (left - cleft) * s:(right - cleft) * s]
        return out


def upscale_image(G: "Generator", lr_uint8: np.ndarray, *, seed: int | None, noise_scale: float, tile: int,
                  tile_pad: int | None, device: str, half: bool = False) -> np.ndarray:
    """Upscale a uint8 HxWx3 RGB image; returns uint8 (4H)x(4W)x3 (clamped to [0,1], x255, rounded half-to-even).

    ``G`` must already live on ``device``. ``half=True`` runs under float16
    autocast and needs a CUDA device.
    """
    import torch

    if lr_uint8.dtype != np.uint8 or lr_uint8.ndim != 3 or lr_uint8.shape[2] != 3:
        raise ValueError(f"expected a uint8 HxWx3 LR image, got {lr_uint8.dtype} {lr_uint8.shape}")
    if half and not str(device).startswith("cuda"):
        raise ValueError(f"half=True needs a CUDA device, got device={device!r}")
    lr = torch.from_numpy(lr_uint8).to(device).permute(2, 0, 1)[None].float() / 255
    with torch.autocast("cuda", dtype=torch.float16) if half else contextlib.nullcontext():
        sr = upscale_tensor(G, lr, seed=seed, noise_scale=noise_scale, tile=tile, tile_pad=tile_pad)
    sr = (sr.float().clamp_(0, 1) * 255).round_()
    return sr[0].permute(1, 2, 0).to("cpu", torch.uint8).numpy()


def _input_files(inputs: Path) -> list[Path]:
    if inputs.is_dir():
        return sorted(p for p in inputs.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if inputs.is_file():
        return [inputs]
    raise FileNotFoundError(f"{inputs}: no such file or folder")


def output_names(stem: str, samples: int) -> list[str]:
    """File names `upscale_command` writes for one input: ``<stem>_x4.png`` or ``<stem>_s<k>.png`` (k from 0)."""
    return [f"{stem}_x{SCALE}.png"] if samples == 1 else [f"{stem}_s{k}.png" for k in range(samples)]


def upscale_command(inputs: Path, out: Path, checkpoint: Path, *, samples: int = 1, seed: int = 0,
                    noise_scale: float = 1.0, tile: int = 0, tile_pad: int | None = 16, device: str = "cpu",
                    half: bool = False) -> int:
    """What `srmap upscale` runs: upscale an image file or every image in a folder into the folder ``out``.

    Sample k uses seed ``seed + k``. A file that cannot be read or upscaled
    gets one line on stderr and is skipped; returns 0 when all succeeded,
    1 when any file failed, 2 when nothing could start (bad checkpoint,
    missing input, bad arguments).
    """
    import torch
    from tqdm import tqdm

    inputs, out = Path(inputs), Path(out)
    try:
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        if half and not str(device).startswith("cuda"):
            raise ValueError(f"--half needs a CUDA device, got device={device!r}")
        files = _input_files(inputs)
        if not files:
            raise FileNotFoundError(f"{inputs}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        G = load_generator(checkpoint, device=device)
    except (FileNotFoundError, ValueError) as exc:
        print(f"srmap upscale: {exc}", file=sys.stderr)
        return 2
    failed = 0
    seen: dict[str, Path] = {}
    for path in tqdm(files, desc="upscale", unit="img", file=sys.stderr):
        try:
            if path.stem in seen:
                raise ValueError(f"same output name as {seen[path.stem].name}; rename one of them")
            seen[path.stem] = path
            lr = read_rgb(path)
            for k, name in enumerate(output_names(path.stem, samples)):
                sr = upscale_image(G, lr, seed=seed + k, noise_scale=noise_scale, tile=tile, tile_pad=tile_pad,
                                   device=device, half=half)
                write_png(out / name, sr)
        except (OSError, ValueError, torch.OutOfMemoryError) as exc:
            failed += 1
            msg = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
            tqdm.write(f"srmap upscale: skipped {msg}", file=sys.stderr)
    if failed:
        print(f"srmap upscale: {failed} of {len(files)} file(s) failed", file=sys.stderr)
        return 1
    return 0
