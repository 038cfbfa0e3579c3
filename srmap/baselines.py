"""Published SR models as baselines: loading any checkpoint, the official weights, external result folders.

* :func:`load_sr_model` opens what `srmap upscale --checkpoint` and the
  ``baselines`` stage accept: SRMAP's own generator files and training
  checkpoints, and any checkpoint that spandrel recognises (ESRGAN/RRDBNet in
  the original or the BasicSR key layout, BasicSR's ``params`` /
  ``params_ema`` wrappers, ``.safetensors``; also Real-ESRGAN, SwinIR, HAT
  and the other architectures of spandrel's MIT-licensed core).
* :class:`PublishedModel` gives such a model the generator's call signature
  (``model(lr, seed=, noise_scale=, origin=)``), so tiled inference and
  scoring treat both kinds alike; published models are deterministic.
* :data:`WEIGHTS` (from ``srmap/baselines.json``) records where the official
  RRDB and ESRGAN x4 weights are published and their SHA-256 prefixes;
  :func:`fetch_weights` downloads them with the resumable, verified download
  code used for DIV2K, or takes a hand-placed copy.
* :func:`count_samples` finds how many samples a folder of released SR
  images (NCSR, SRFlow, ...) holds per image, in either layout that
  ``srmap.evaluate`` reads.
* :func:`baseline_methods` turns a profile's ``baselines`` section into the
  Table 2 rows (``srmap.evaluate.Method``) the ``baselines`` stage scores.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:
    import torch

SCALE = 4


@dataclass(frozen=True)
class Weights:
    """Where one published model's weights come from (an entry of ``srmap/baselines.json``)."""

    slug: str            # method slug in metrics.json, e.g. 'esrgan'
    label: str           # Table 2 row label, e.g. 'ESRGAN'
    file: str            # file name, kept as published (BasicSR names end in the SHA-256 prefix)
    url: str             # where the file is published
    sha256: str          # hex SHA-256, or its published prefix (at least 8 hex digits)
    size: int | None     # bytes, when published; None otherwise
    source: str          # who publishes it and what it is


def _load_weights() -> dict[str, Weights]:
    entries = json.loads(Path(__file__).with_name("baselines.json").read_text())
    return {slug: Weights(slug=slug, **entry) for slug, entry in entries.items() if not slug.startswith("_")}


WEIGHTS: dict[str, Weights] = _load_weights()


def weights_path(slug: str, models_dir: Path) -> Path:
    """Where the official weights of ``slug`` ('rrdb', 'esrgan') live: ``models_dir/<published file name>``.

    Raises ValueError naming the known slugs for any other name.
    """
    if slug not in WEIGHTS:
        raise ValueError(f"unknown published baseline {slug!r}; known: {', '.join(sorted(WEIGHTS))} "
                         f"(any other model: give its checkpoint file)")
    return Path(models_dir) / WEIGHTS[slug].file


def fetch_weights(slug: str, models_dir: Path, *, download: bool = True, base_url: str | None = None,
                  progress: bool = True) -> Path:
    """The verified official weights of ``slug`` in ``models_dir``; downloaded first if absent and ``download``.

    A hand-placed file is used once its SHA-256 matches the published value
    (prefix). With ``download=False`` a missing file raises FileNotFoundError
    naming the file, the folder to put it in and its URL. ``base_url``
    replaces the URL's folder (tests, mirrors). Raises
    ``srmap.download.ChecksumError`` for a wrong file and
    ``srmap.download.DownloadError`` when the host cannot be reached.
    """
    from srmap.download import DownloadError, fetch_archive, verify_file

    path = weights_path(slug, models_dir)
    meta = WEIGHTS[slug]
    url = f"{base_url.rstrip('/')}/{meta.file}" if base_url else meta.url
    if path.is_file():
        verify_file(path, size=meta.size, sha256=meta.sha256, progress=progress)
        return path
    if not download:
        raise FileNotFoundError(f"{path}: weights of {meta.label} not found; put {meta.file} in "
                                f"{Path(models_dir)}/ (published at {meta.url})")
    try:
        return fetch_archive(url, path, size=meta.size, sha256=meta.sha256, progress=progress)
    except DownloadError as exc:
        raise DownloadError(f"{meta.label}: {exc}") from exc


class PublishedModel:
    """A deterministic x4 SR model loaded by spandrel, called like SRMAP's generator.

    ``model(lr, seed=None, noise_scale=0.0, origin=(0, 0))`` maps float
    (N,3,h,w) RGB in [0,1] to (N,3,4h,4w) in [0,1]; ``seed``, ``noise_scale``
    and ``origin`` are accepted and ignored (no noise). ``receptive_radius``
    is the smallest tile pad (LR pixels) for which tiled output equals the
    whole-image output, or None where it is not known for the architecture
    (attention windows, global pooling): tiles are then approximate.
    """

    deterministic = True

    def __init__(self, descriptor: Any, path: Path):
        self.descriptor = descriptor
        self.path = Path(path)
        self.architecture = descriptor.architecture.name
        self.scale = int(descriptor.scale)
        self.receptive_radius = _receptive_radius(descriptor)

    def to(self, device: "str | torch.device") -> "PublishedModel":
        """Move the weights to ``device``; returns self."""
        self.descriptor.to(device)
        return self

    def __call__(self, lr: "torch.Tensor", *, seed: int | None = None, noise_scale: float = 0.0,
                 origin: tuple[int, int] = (0, 0)) -> "torch.Tensor":
        # spandrel's call pads to the architecture's size requirements, runs under inference_mode and
        # clamps; the clone makes its inference tensor an ordinary one that callers may update in place
        return self.descriptor(lr.to(self.descriptor.dtype)).clone()

    def __repr__(self) -> str:
        return f"PublishedModel({self.architecture} x{self.scale}, {self.path.name})"


def _receptive_radius(descriptor: Any) -> int | None:
    """Receptive radius in LR pixels of the architectures where it is exact and known, else None.

    ESRGAN's RRDBNet (Wang et al. 2018, Fig. 4): one 3x3 conv, ``nb`` RRDBs of
    3 dense blocks x 5 3x3 convs, one trunk conv at LR; then two
    nearest-x2 + 3x3 conv stages and two 3x3 convs at HR, which reach
    0.5 + 0.25 + 2 x 0.25 = 1.25 LR pixels: ``15 nb + 2 + 2`` (rounded up).
    """
    if descriptor.architecture.id != "ESRGAN":
        return None
    hp = getattr(descriptor.model, "hyperparameters", {})
    if hp.get("plus") or hp.get("shuffle_factor") or hp.get("upsampler", "upconv") != "upconv" \
            or int(hp.get("scale", 0)) != SCALE:
        return None
    return 15 * int(hp["num_blocks"]) + 4


def is_srmap_checkpoint(ckpt: Mapping) -> bool:
    """True for SRMAP's own files: a generator file (key 'format') or a training checkpoint ('gen_config')."""
    return "format" in ckpt or "gen_config" in ckpt


def load_sr_model(path: str | Path, device: str = "cpu"):
    """Load any x4 model a user hands us; returns an SRMAP ``Generator`` or a :class:`PublishedModel`, eval mode.

    SRMAP generator files and training checkpoints go to
    ``srmap.inference.load_generator``; every other file to spandrel (plain
    state dicts in the original ESRGAN or BasicSR layout, ``params`` /
    ``params_ema`` wrappers, ``.safetensors``). Files are read without
    running pickled code (``torch.load(weights_only=True)``, safetensors).
    Raises FileNotFoundError for a missing file and ValueError with one short
    line naming the file for a file neither loader recognises (its key count
    and first keys), a model that is not x4 RGB super-resolution, or
    non-finite weights.
    """
    import torch

    from srmap.checkpoint import load_checkpoint
    from srmap.inference import load_generator

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state: Mapping = load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{path}: not a readable .safetensors file ({exc})") from exc
    else:
        state = load_checkpoint(path, map_location="cpu")
        if is_srmap_checkpoint(state):
            return load_generator(path, device=device)
    descriptor = _spandrel_descriptor(state, path)
    bad = [k for k, v in descriptor.model.state_dict().items()
           if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{path}: {len(bad)} weight tensor(s) hold NaN or inf (e.g. {bad[0]}); "
                         f"the model diverged or the file is damaged")
    return PublishedModel(descriptor.eval(), path).to(device)


def _spandrel_descriptor(state: Mapping, path: Path):
    """spandrel's ImageModelDescriptor for ``state``; ValueError naming ``path`` if unusable here."""
    from spandrel import ImageModelDescriptor, ModelLoader, UnsupportedModelError

    from srmap.inference import describe_keys

    try:
        descriptor = ModelLoader().load_from_state_dict(dict(state))
    except UnsupportedModelError:
        raise ValueError(f"{path}: neither an SRMAP checkpoint nor a model spandrel recognises "
                         f"({describe_keys(state)})") from None
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ValueError(f"{path}: looks like {_guess(state)} but its weights do not load ({first})") from None
    name = descriptor.architecture.name
    if not isinstance(descriptor, ImageModelDescriptor) or descriptor.purpose != "SR":
        raise ValueError(f"{path}: a {name} model for {descriptor.purpose}, not super-resolution")
    if descriptor.scale != SCALE or descriptor.input_channels != 3 or descriptor.output_channels != 3:
        raise ValueError(f"{path}: a {name} model for x{descriptor.scale}, {descriptor.input_channels}->"
                         f"{descriptor.output_channels} channels; expected x{SCALE} RGB->RGB")
    return descriptor


def _guess(state: Mapping) -> str:
    return "an SR model" if any(str(k).endswith("weight") for k in state) else "a checkpoint"


def count_samples(gt_stems: Sequence[str], sr_dir: Path) -> int:
    """Samples per image in a folder of released SR results, in either layout ``srmap.evaluate`` reads.

    ``gt_stems`` are the GT file stems in sorted order. Counts
    ``<stem>_s<k>.png`` files (k = 0, 1, ...) of the first stem, or the
    challenge layout's ``000000_sample<k>.png``; a lone ``<stem>.png`` (or
    ``000000.png``) counts as one. Raises FileNotFoundError naming the folder
    when it is missing or holds none of these for the first image.
    """
    sr_dir = Path(sr_dir)
    if not sr_dir.is_dir():
        raise FileNotFoundError(f"{sr_dir}: external results folder not found")
    if not gt_stems:
        raise ValueError("count_samples: no GT images")
    stem = gt_stems[0]

    def run_length(name_of) -> int:
        k = 0
        while (sr_dir / name_of(k)).is_file():
            k += 1
        return k

    for count in (run_length(lambda k: f"{stem}_s{k}.png"), run_length(lambda k: f"000000_sample{k:05d}.png")):
        if count:
            return count
    if (sr_dir / f"{stem}.png").is_file() or (sr_dir / "000000.png").is_file() \
            or (sr_dir / f"{stem}_x{SCALE}.png").is_file():
        return 1
    raise FileNotFoundError(f"{sr_dir}: no SR image for the first GT image {stem!r} (expected {stem}_s0.png, "
                            f"000000_sample00000.png or {stem}.png)")


def method_slug(name: str) -> str:
    """Slug of a configured row name ('NCSR' -> 'ncsr', 'Real-ESRGAN x4' -> 'real_esrgan_x4').

    Raises ValueError for a name without letters or digits.
    """
    slug = re.sub(r"[^a-z0-9]+", "_", str(name).lower()).strip("_")
    if not slug:
        raise ValueError(f"baseline name {name!r}: needs letters or digits")
    return slug


def baseline_methods(section: Mapping[str, Any], *, root: Path, models_dir: Path, gt_stems: Sequence[str],
                     base_url: str | None = None, progress: bool = True) -> list:
    """Table 2 rows of the ``baselines`` stage, in order: Bicubic, published models, checkpoints, external folders.

    ``section`` is a profile's ``baselines`` params: ``models`` (slugs of
    :data:`WEIGHTS`, fetched into ``models_dir`` unless ``download`` is
    false), ``checkpoints`` ({row name: checkpoint path}) and ``external``
    ({row name: folder of released SR images}); relative paths are taken from
    ``root``. ``gt_stems`` (sorted validation stems) fixes an external
    folder's sample count. Returns ``srmap.evaluate.Method`` records. Raises
    FileNotFoundError naming a missing file or folder (for official weights:
    where to put it and its URL) and ValueError for clashing names.
    """
    from srmap.download import DownloadError
    from srmap.evaluate import Method

    root = Path(root)
    methods = [Method("bicubic", "Bicubic")]
    for slug in section["models"]:
        try:
            path = fetch_weights(str(slug), models_dir, download=bool(section["download"]), base_url=base_url,
                                 progress=progress)
        except DownloadError as exc:
            raise FileNotFoundError(f"{weights_path(str(slug), models_dir)}: not there and the download failed: "
                                    f"{exc}") from None
        methods.append(Method(str(slug), WEIGHTS[str(slug)].label, checkpoint=path))
    for name, file in section["checkpoints"].items():
        path = root / str(file)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: checkpoint of baseline {name!r} not found "
                                    f"(params: baselines.checkpoints.{name})")
        methods.append(Method(method_slug(name), str(name), checkpoint=path))
    for name, folder in section["external"].items():
        sr_dir = root / str(folder)
        methods.append(Method(method_slug(name), str(name), sr_dir=sr_dir, samples=count_samples(gt_stems, sr_dir)))
    slugs = [m.slug for m in methods]
    clash = sorted({s for s in slugs if slugs.count(s) > 1})
    if clash:
        raise ValueError(f"baselines: two rows share the name {clash[0]!r}; rename one in params.yaml")
    return methods
