"""Table 2's baselines: the official weights of published models, released result folders, the stage's rows.

(Loading any model file, SRMAP's or a published one, is :mod:`srmap.loaders`.)

* :data:`WEIGHTS` (from ``srmap/baselines.json``) records where the official
  RRDB and ESRGAN x4 weights are published and their SHA-256 prefixes;
  :func:`fetch_weights` downloads them with the resumable, verified download
  code used for DIV2K, or takes a hand-placed copy.
* :func:`count_samples` finds how many samples a folder of released SR
  images (NCSR, SRFlow, ...) holds per image, in either layout that
  ``srmap.evaluate`` reads.
  ``SRMAP_BASELINES_JSON`` names a replacement for baselines.json (mirrors, or
  the fabricated weights of scripts/rehearse_paper.py).
* :func:`baseline_methods` turns a profile's ``baselines`` section into the
  Table 2 rows (``srmap.evaluate.Method``) the ``baselines`` stage scores.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from srmap.options import PROJECTED, SCALE
from srmap.utils import read_metadata

METADATA_ENV = "SRMAP_BASELINES_JSON"  # a replacement for srmap/baselines.json (mirrors, the paper-path rehearsal)



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
    entries = read_metadata(Path(__file__).with_name("baselines.json"), METADATA_ENV)
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
                     base_url: str | None = None, progress: bool = True,
                     consistency: Sequence[str] = ("none",)) -> list:
    """Table 2 rows of the ``baselines`` stage, in order: Bicubic, published models, checkpoints, external folders.

    ``section`` is a profile's ``baselines`` params: ``models`` (slugs of
    :data:`WEIGHTS`, fetched into ``models_dir`` unless ``download`` is
    false), ``checkpoints`` ({row name: checkpoint path}) and ``external``
    ({row name: folder of released SR images}); relative paths are taken from
    ``root``. ``gt_stems`` (sorted validation stems) fixes an external
    folder's sample count. ``consistency`` (evaluate.consistency) adds, for
    "project", a Bicubic row projected onto the consistent images (as the
    evaluate stage adds projected rows of its models); without "none" the
    plain Bicubic row is left out. Returns ``srmap.evaluate.Method`` records. Raises
    FileNotFoundError naming a missing file or folder (for official weights:
    where to put it and its URL) and ValueError for clashing names.
    """
    from srmap.download import DownloadError
    from srmap.evaluate import Method

    root = Path(root)
    methods = [Method("bicubic", "Bicubic")] if "none" in consistency else []
    if "project" in consistency:
        methods.append(Method(f"bicubic{PROJECTED[0]}", f"Bicubic{PROJECTED[1]}", consistency="project"))
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
