"""The report: Table 2 (measured and published rows), Figures 2-4 and a self-contained HTML page.

Everything measured comes from the metrics ``evaluate_stage`` returned
({slug: {metric: number}}), the ``methods.json`` it wrote next to its images
(labels, row order, the LPIPS weight source) and the images themselves; the
published rows come from ``srmap/published.csv`` and are shown in their own
block, labelled as not re-run. The LPIPS weight source is printed under the
table. When LPIPS ran with the random trunk (smoke tests only), every LPIPS and
diversity number of this run carries "random AlexNet trunk, not comparable".
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

import numpy as np

from srmap.explorer import EXPLORER_CSS, build_entries, explorer_html, stochasticity_map
from srmap.imageio import read_rgb8
from srmap.options import LOSSES, PROJECTED, SCALE
from srmap.utils import atomic_path, atomic_write_text

HEADERS = ["LPIPS ↓", "LR-PSNR ↑", "diversity ↑", "PSNR ↑", "SSIM ↑"]
# Summary key behind each measured column, and its printed precision.
MEASURED_KEYS = [("lpips", 3), ("lr_psnr", 2), ("diversity", 2), ("psnr", 2), ("ssim", 4)]
DETAIL_KEYS = ["lpips", "lr_psnr", "lr_psnr_worst", "diversity", "psnr", "ssim", "psnr_y", "ssim_y", "samples",
               "images"]
PUBLISHED_COLUMNS = ["slug", "source", "method", "LPIPS", "LR-PSNR", "diversity"]
NOT_COMPARABLE = "random AlexNet trunk, not comparable"
# Slugs of the methods Figures 2 and 3 show: the L1 generator and SRMAP.
L1_SLUG, SRMAP_SLUG, BICUBIC_SLUG = "l1", "srmap", "bicubic"
GAN_COLUMNS = ["step", "epoch", *LOSSES["train_gan"], "lr_g", "lr_d"]  # the losses.csv columns Figure 4 reads
PRETRAIN_COLUMNS = ["step", "epoch", *LOSSES["pretrain"], "lr"]


# ---------------------------------------------------------------------------
# Table 2
# ---------------------------------------------------------------------------


def _fmt(value: Any, digits: int) -> str:
    if value is None:
        return "—"
    v = float(value)
    if math.isnan(v):
        return "n/a"
    if math.isinf(v):
        return "∞" if v > 0 else "-∞"
    return f"{v:.{digits}f}"


def read_methods(results_dir: Path) -> dict:
    """``results_dir/methods.json`` as evaluate_stage wrote it: {"lpips": {pretrained, weights}, "methods": [...]}."""
    path = Path(results_dir) / "methods.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (evaluate writes it next to the SR images)")
    info = json.loads(path.read_text())
    for key in ("lpips", "methods"):
        if key not in info:
            raise ValueError(f"{path}: missing key {key!r}")
    for m in info["methods"]:
        for key in ("slug", "label", "samples"):
            if key not in m:
                raise ValueError(f"{path}: a method lacks key {key!r}")
    return info


def measured_rows(metrics: Mapping[str, Mapping], info: Mapping, profile: str) -> list[dict[str, str]]:
    """Table 2 rows of this run, in methods.json order: method (label), source, the five formatted cells, note.

    ``metrics`` is {slug: {metric: number}}; ``info`` the methods.json dict.
    LPIPS and diversity cells of a run with the random trunk are suffixed with
    the not-comparable mark.
    """
    rows = []
    comparable = bool(info["lpips"]["pretrained"])
    for method in info["methods"]:
        slug = method["slug"]
        if slug not in metrics:
            raise ValueError(f"metrics: no entry for method {slug!r} (have {sorted(metrics)})")
        missing = [k for k, _ in MEASURED_KEYS if k not in metrics[slug]]
        if missing:
            raise ValueError(f"metrics[{slug!r}]: missing key {missing[0]!r} (expected evaluate_stage's metrics)")
        cells = [_fmt(metrics[slug][k], d) for k, d in MEASURED_KEYS]
        note = ""
        if not comparable:
            cells[0] += f" ({NOT_COMPARABLE})"
            cells[2] += f" ({NOT_COMPARABLE})"
            note = f"LPIPS and diversity: {NOT_COMPARABLE}"
        rows.append({"method": method["label"], "source": f"measured, profile {profile}", **dict(zip(HEADERS, cells)),
                     "note": note})
    return rows


def read_published(path: Path) -> list[dict[str, str]]:
    """Rows of the published-results CSV (columns slug, source, method, LPIPS, LR-PSNR, diversity), strings as written.

    ``slug`` names the method as metrics.json does, so a row can be matched to a measured one without its label.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: published-results CSV not found")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != PUBLISHED_COLUMNS:
            raise ValueError(f"{path}: columns {reader.fieldnames}; expected {PUBLISHED_COLUMNS}")
        rows = list(reader)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def published_rows(path: Path, measured_slugs: Collection[str] = ()) -> list[dict[str, str]]:
    """Published rows in Table 2's columns (PSNR/SSIM '—': the sources do not report them).

    Rows whose slug is in ``measured_slugs`` (baselines this run measured with the published model or its
    released outputs) are left out: the measured row replaces the copied one.
    """
    return [{"method": r["method"], "source": r["source"], "LPIPS ↓": r["LPIPS"], "LR-PSNR ↑": r["LR-PSNR"],
             "diversity ↑": r["diversity"], "PSNR ↑": "—", "SSIM ↑": "—", "note": "published, not re-run"}
            for r in read_published(path) if r["slug"] not in set(measured_slugs)]


def _md_table(rows: list[dict[str, str]], first: str) -> list[str]:
    cols = [first] + HEADERS
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] + [":-:"] * len(HEADERS)) + "|"]
    for r in rows:
        label = r["method"] if first == "method" else f"{r['method']} ({r['source']})"
        lines.append("| " + " | ".join([label] + [r[h] for h in HEADERS]) + " |")
    return lines


def table2_markdown(measured: list[dict], published: list[dict], profile: str, lpips_weights: str) -> str:
    """Table 2 as Markdown: the measured block, then the published block with each row's source."""
    lines = [f"# Table 2 (profile `{profile}`)", "", "## Measured in this run", ""]
    lines += _md_table(measured, "method")
    if any(r["note"] for r in measured):
        lines += ["", f"**LPIPS and diversity of this run: {NOT_COMPARABLE}** (LPIPS ran with a randomly "
                      "initialised AlexNet trunk, `lpips_pretrained: false`, a smoke-test setting)."]
    lines += ["", f"LPIPS weights: {lpips_weights}.", "",
              "LPIPS: mean over samples (AlexNet, v0.1, spatial); LR-PSNR: mean over samples, dB; diversity: "
                  "NTIRE 2021 score, %; PSNR (dB) / SSIM: RGB, 4-pixel border shaved (BasicSR), mean over samples. "
                  "Dataset values are plain means over images.", "",
              "## Published, not re-run", ""]
    lines += _md_table(published, "method (source)")
    return "\n".join(lines) + "\n"


def write_table2(measured: list[dict], published: list[dict], out_dir: Path, profile: str,
                 lpips_weights: str) -> None:
    """Write out_dir/table2.md and out_dir/table2.csv (columns block, method, source, the five metrics, note)."""
    atomic_write_text(out_dir / "table2.md", table2_markdown(measured, published, profile, lpips_weights))
    with atomic_path(out_dir / "table2.csv") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["block", "method", "source"] + HEADERS + ["note"])
            for block, rows in (("measured", measured), ("published, not re-run", published)):
                for r in rows:
                    w.writerow([block, r["method"], r["source"]] + [r[h] for h in HEADERS] + [r["note"]])


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------


def _method(info: Mapping, slug: str) -> Mapping:
    for m in info["methods"]:
        if m["slug"] == slug:
            return m
    raise ValueError(f"methods.json: no method {slug!r}, which Figures 2 and 3 need "
                     f"(have {[m['slug'] for m in info['methods']]})")


def _sr_paths(results_dir: Path, info: Mapping, slug: str, stem: str) -> list[Path]:
    n = int(_method(info, slug)["samples"])
    folder = Path(results_dir) / "sr" / slug
    paths = [folder / f"{stem}.png"] if n == 1 else [folder / f"{stem}_s{k}.png" for k in range(n)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: SR image of {slug!r} not found (expected {n} output(s) per image)")
    return paths


def _texture(gray: np.ndarray) -> np.ndarray:
    """Mean absolute finite difference per pixel (float64 HxW), a cheap texture measure."""
    gx = np.abs(np.diff(gray, axis=1, append=gray[:, -1:]))
    gy = np.abs(np.diff(gray, axis=0, append=gray[-1:, :]))
    return gx + gy


def pick_crop(hr_images: Mapping[str, np.ndarray], crop_size: int, seed: int,
              candidates: int = 64) -> tuple[str, int, int, int]:
    """Choose Figure 2's HR window: (stem, top, left, size), the most textured of seeded random candidates.

    Takes uint8 HxWx3 HR images by stem. ``size`` is ``crop_size`` shrunk to
    fit the smallest image and rounded down to a multiple of 4; top/left are
    multiples of 4 so the window maps onto whole LR pixels. Same inputs and
    seed, same window.
    """
    if not hr_images:
        raise ValueError("pick_crop: no HR images")
    smallest = min(min(img.shape[:2]) for img in hr_images.values())
    size = min(int(crop_size), smallest) // SCALE * SCALE
    if size < SCALE:
        raise ValueError(f"HR images ({smallest} px) are too small for a crop of {crop_size} px")
    rng = np.random.default_rng(seed)
    stems = sorted(hr_images)
    best = None
    for _ in range(candidates):
        stem = stems[int(rng.integers(len(stems)))]
        img = hr_images[stem]
        top = int(rng.integers((img.shape[0] - size) // SCALE + 1)) * SCALE
        left = int(rng.integers((img.shape[1] - size) // SCALE + 1)) * SCALE
        window = img[top:top + size, left:left + size].astype(np.float64).mean(axis=2)
        score = float(_texture(window).mean())
        if best is None or score > best[0]:
            best = (score, stem, top, left)
    return best[1], best[2], best[3], size


def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure2(info: Mapping, results_dir: Path, valid_dir: Path, hr_images: Mapping[str, np.ndarray],
            crop_size: int, seed: int, out: Path) -> str:
    """Figure 2: LR | HR | L1 output | SRMAP output (sample 0) on one window; returns the chosen image stem."""
    plt = _plt()
    stem, top, left, size = pick_crop(hr_images, crop_size, seed)
    lr = read_rgb8(Path(valid_dir) / "lr" / f"{stem}.png")
    s = size // SCALE
    lr_crop = lr[top // SCALE:top // SCALE + s, left // SCALE:left // SCALE + s]
    panels = [("Input LR (nearest x4)", np.repeat(np.repeat(lr_crop, SCALE, 0), SCALE, 1)),
              ("Ground-truth HR", hr_images[stem][top:top + size, left:left + size])]
    for title, slug in ((_method(info, L1_SLUG)["label"], L1_SLUG),
                        (f"{_method(info, SRMAP_SLUG)['label']}, sample 0", SRMAP_SLUG)):
        sr = read_rgb8(_sr_paths(results_dir, info, slug, stem)[0])
        panels.append((title, sr[top:top + size, left:left + size]))
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.4))
    for ax, (title, img) in zip(axes, panels):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.suptitle(f"{stem}: HR window at (row {top}, col {left}), {size}x{size} px", fontsize=10)
    _save_figure(fig, out)
    return stem


def figure3(info: Mapping, results_dir: Path, hr: np.ndarray, stem: str, out: Path) -> None:
    """Figure 3: the HR image next to the per-pixel std across the SRMAP samples (brighter = more difference).

    When ``info`` lists the projected SRMAP row (slug ``srmap_projected``), a
    third panel shows the std across its samples on the same colour scale, so
    the spread the projection keeps can be read off directly. Std in 0-255
    units over uint8 samples (``srmap.explorer.stochasticity_map``).
    """
    plt = _plt()
    rows = [(SRMAP_SLUG, "SRMAP")]
    if any(m["slug"] == SRMAP_SLUG + PROJECTED[0] for m in info["methods"]):
        rows.append((SRMAP_SLUG + PROJECTED[0], "SRMAP" + PROJECTED[1]))
    samples = {slug: [read_rgb8(p) for p in _sr_paths(results_dir, info, slug, stem)] for slug, _ in rows}
    h = min([hr.shape[0]] + [s.shape[0] for ss in samples.values() for s in ss])
    w = min([hr.shape[1]] + [s.shape[1] for ss in samples.values() for s in ss])
    stds = {slug: stochasticity_map([s[:h, :w] for s in ss]) for slug, ss in samples.items()}
    vmax = max(float(std.max()) for std in stds.values()) or 1.0
    n = 1 + len(rows)
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4.6 * h / max(w, 1) + 0.8), layout="constrained")
    axes[0].imshow(hr[:h, :w])
    axes[0].set_title(f"Ground-truth HR ({stem})", fontsize=10)
    for ax, (slug, name) in zip(axes[1:], rows):
        std = stds[slug]
        im = ax.imshow(std, cmap="gray", vmin=0, vmax=vmax)
        ax.set_title(f"Std across {len(samples[slug])} {name} sample(s)\nmax {std.max():.2f}, "
                     f"mean {std.mean():.2f} / 255", fontsize=10)
    for ax in axes:
        ax.axis("off")
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="std (0-255 scale)")  # on every panel, so they match
    _save_figure(fig, out)


def _read_loss_csv(path: Path, columns: list[str]):
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: loss CSV not found")
    df = pd.read_csv(path)
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column {missing[0]!r} (expected {','.join(columns)})")
    if len(df) == 0:
        raise ValueError(f"{path}: no rows")
    return df


def _lr_changes(df, column: str) -> list[float]:
    lr = df[column].to_numpy(dtype=np.float64)
    return [float(df["step"].iloc[i]) for i in range(1, len(lr)) if lr[i] != lr[i - 1]]


def figure4(loss_csvs: Mapping[str, Path], out: Path) -> None:
    """Figure 4: fidelity, generator and critic losses of train_gan (and pretrain L1) against the step.

    ``loss_csvs`` has 'train_gan' (columns step,epoch,fidelity,generator,
    critic,r1,lr_g,lr_d) and optionally 'pretrain' (step,epoch,l1,lr).
    Dashed lines mark learning-rate changes.
    """
    plt = _plt()
    unknown = sorted(set(loss_csvs) - {"train_gan", "pretrain"})
    if unknown:
        raise ValueError(f"loss_csvs: unknown key {unknown[0]!r} (expected 'train_gan' and optionally 'pretrain')")
    if "train_gan" not in loss_csvs:
        raise ValueError("loss_csvs: missing key 'train_gan'")
    gan = _read_loss_csv(loss_csvs["train_gan"], GAN_COLUMNS)
    panels = [(gan, "fidelity", r"Fidelity $\|y - \mathrm{down}(G(y))\|_1$", "lr_g"),
              (gan, "generator", "Generator", "lr_g"),
              (gan, "critic", "Critic (discriminator)", "lr_d")]
    if loss_csvs.get("pretrain") is not None:
        panels.insert(0, (_read_loss_csv(loss_csvs["pretrain"], PRETRAIN_COLUMNS), "l1", "Pretraining L1", "lr"))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2))
    for ax, (df, col, title, lr_col) in zip(np.atleast_1d(axes), panels):
        ax.plot(df["step"], df[col], lw=0.8, alpha=0.5 if len(df) > 20 else 1.0)
        if len(df) > 20:
            ax.plot(df["step"], df[col].rolling(max(len(df) // 20, 2), min_periods=1).mean(), lw=1.5)
        for step in _lr_changes(df, lr_col):
            ax.axvline(step, ls="--", color="gray", lw=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, out)


# ---------------------------------------------------------------------------
# HTML page
# ---------------------------------------------------------------------------


def _html_table(rows: list[dict[str, str]], with_source: bool) -> str:
    head = "<th>method</th>" + ("<th>source</th>" if with_source else "") + "".join(
        f"<th>{html.escape(h)}</th>" for h in HEADERS)
    body = []
    for r in rows:
        cells = f"<td>{html.escape(r['method'])}</td>"
        if with_source:
            cells += f"<td>{html.escape(r['source'])}</td>"
        cells += "".join(f"<td>{html.escape(r[h])}</td>" for h in HEADERS)
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _details_table(metrics: Mapping[str, Mapping], info: Mapping) -> str:
    head = "<th>method</th><th>slug</th>" + "".join(f"<th>{k}</th>" for k in DETAIL_KEYS)
    rows = []
    for m in info["methods"]:
        leaves = metrics[m["slug"]]
        cells = [_fmt(leaves[k], 4) if isinstance(leaves.get(k), float) else html.escape(str(leaves.get(k, "—")))
                 for k in DETAIL_KEYS]
        rows.append(f"<tr><td>{html.escape(m['label'])}</td><td><code>{html.escape(m['slug'])}</code></td>"
                    + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return (f'<div style="overflow-x:auto"><table><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div>")


def _img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1em}th,td{border:1px solid #bbb;padding:4px 8px;text-align:center}
th{background:#f0f0f0}.warn{background:#fff3cd;border:1px solid #e0c060;padding:0.6em}
img{max-width:100%;height:auto;display:block;margin:0.5em 0}figcaption{font-size:0.9em;color:#555}
""" + EXPLORER_CSS


def report_html(*, measured: list[dict], published: list[dict], metrics: Mapping, info: Mapping,
                figures: Mapping[str, Path], profile: str, seed: int, crop_size: int,
                explorer: Sequence[dict] = ()) -> str:
    """The report page as one self-contained HTML string (figures embedded as PNG data URIs)."""
    warn = ""
    if any(r["note"] for r in measured):
        warn = (f'<p class="warn"><strong>LPIPS and diversity of this run: {NOT_COMPARABLE}.</strong> '
                "LPIPS used a randomly initialised AlexNet trunk (lpips_pretrained: false, a smoke-test setting); "
                "those numbers only compare methods within this run.</p>")
    captions = {
        "fig2": "Figure 2. Super-resolution demonstration. First: input LR. Second: ground-truth HR. "
                "Third: output of the L1-pretrained generator. Fourth: SRMAP output (sample 0).",
        "fig3": "Figure 3. Stochasticity. First: HR image. Second: per-pixel standard deviation across the "
                "SRMAP samples (brighter = more difference). Third, when Table 2 has it: the same for the SRMAP "
                "samples projected onto the input (srmap.resize), on the same scale.",
        "fig4": "Figure 4. Loss curves against the training step (dashed: learning-rate changes).",
    }
    figs = "".join(f"<figure>{_img_tag(path, name)}<figcaption>{html.escape(captions[name])}</figcaption></figure>"
                   for name, path in figures.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>SRMAP report ({html.escape(profile)})</title>
<style>{_CSS}</style></head><body>
<h1>SRMAP report: profile <code>{html.escape(profile)}</code></h1>
<p>4x super-resolution, NTIRE 2021 "Learning the SR space" protocol. Report seed {seed}, Figure 2 crop
{crop_size} px.</p>
<h2>Table 2</h2>
<h3>Measured in this run</h3>
{warn}
{_html_table(measured, with_source=False)}
<p>LPIPS weights: {html.escape(info["lpips"]["weights"])}.</p>
<p>LPIPS: mean over samples (AlexNet, v0.1, spatial). LR-PSNR: mean over samples, dB. Diversity: NTIRE 2021
score, %. PSNR (dB) / SSIM: RGB, 4-pixel border shaved (BasicSR), mean over samples. Dataset values are plain
means over images.</p>
<h3>Published, not re-run</h3>
{_html_table(published, with_source=True)}
<h3>All measured numbers</h3>
{_details_table(metrics, info)}
{explorer_html(explorer)}
<h2>Figures</h2>
{figs}
</body></html>
"""


def merge_results(baselines: tuple[Mapping, Path] | None, results: Mapping, results_dir: Path) -> tuple[dict, dict]:
    """One metrics dict and one methods.json dict for Table 2: the baselines stage's rows, then evaluate's.

    ``baselines`` is (metrics, folder holding its methods.json) or None. Raises
    ValueError when both stages scored a method of the same slug or with
    different LPIPS weights (their numbers would not be comparable).
    """
    info = read_methods(results_dir)
    if baselines is None:
        return dict(results), info
    b_metrics, b_dir = baselines
    b_info = read_methods(b_dir)
    if b_info["lpips"] != info["lpips"]:
        raise ValueError(f"{Path(b_dir) / 'methods.json'}: LPIPS weights {b_info['lpips']['weights']!r} differ from "
                         f"evaluate's {info['lpips']['weights']!r}; re-run both stages")
    clash = sorted(set(b_metrics) & set(results))
    if clash:
        raise ValueError(f"method {clash[0]!r} is scored by both the baselines and the evaluate stage")
    return {**b_metrics, **results}, {"lpips": info["lpips"], "methods": b_info["methods"] + info["methods"]}


EXPLORER_IMAGES = 4  # validation images in the sample explorer (the first by name)
EXPLORER_GRID = 3  # windows per side of each image in the explorer
EXPLORER_CROP = 128  # largest HR window in the explorer (px): keeps the page to a few MB per image


def _explorer_paths(info: Mapping, results_dir: Path, baselines: tuple[Mapping, Path] | None):
    """sr_paths(role, stem) for the explorer ('bicubic', 'l1', 'srmap', 'srmap_projected'): evaluate's methods from
    ``results_dir``, Bicubic from the baselines stage's folder."""
    slugs = {"bicubic": BICUBIC_SLUG, "l1": L1_SLUG, "srmap": SRMAP_SLUG, "srmap_projected": SRMAP_SLUG + PROJECTED[0]}

    def paths(role: str, stem: str) -> list[Path]:
        slug = slugs[role]
        if slug == BICUBIC_SLUG:
            if baselines is None:
                raise FileNotFoundError("no baselines stage output")
            return _sr_paths(baselines[1], read_methods(baselines[1]), slug, stem)
        return _sr_paths(results_dir, info, slug, stem)
    return paths


def build_report(*, results: dict, results_dir: Path, valid_dir: Path, loss_csvs: dict, published_csv: Path,
                 out_dir: Path, crop_size: int, seed: int, profile: str,
                 baselines: tuple[Mapping, Path] | None = None) -> None:
    """Write table2.md, table2.csv, fig2.png, fig3.png, fig4.png and index.html (with the sample explorer of
    :mod:`srmap.explorer`) into ``out_dir``.

    ``results`` is evaluate_stage's metrics dict {slug: {metric: number}};
    ``results_dir`` the folder evaluate_stage wrote (methods.json and
    sr/<slug>/; the figures need the methods 'l1' and 'srmap'); ``baselines``
    the baselines stage's (metrics, folder) whose rows come first and whose
    slugs drop the copied published rows; ``valid_dir`` holds hr/ and lr/;
    ``loss_csvs`` maps 'train_gan' (and optionally 'pretrain') to loss CSVs.
    Every file is written atomically.
    """
    out_dir, valid_dir, results_dir = Path(out_dir), Path(valid_dir), Path(results_dir)
    if not results:
        raise ValueError("results: empty; expected evaluate_stage's {slug: metrics} dict")
    figure_info = read_methods(results_dir)
    results, info = merge_results(baselines, results, results_dir)
    measured = measured_rows(results, info, profile)
    published = published_rows(Path(published_csv), measured_slugs=set(baselines[0]) if baselines else ())
    out_dir.mkdir(parents=True, exist_ok=True)
    write_table2(measured, published, out_dir, profile, info["lpips"]["weights"])

    hr_dir = valid_dir / "hr"
    hr_files = sorted(hr_dir.glob("*.png"))
    if not hr_files:
        raise FileNotFoundError(f"{hr_dir}: no HR .png images for the figures")
    hr_images = {p.stem: read_rgb8(p) for p in hr_files}
    figures = {"fig2": out_dir / "fig2.png", "fig3": out_dir / "fig3.png", "fig4": out_dir / "fig4.png"}
    stem = figure2(figure_info, results_dir, valid_dir, hr_images, crop_size, seed, figures["fig2"])
    figure3(figure_info, results_dir, hr_images[stem], stem, figures["fig3"])
    figure4(loss_csvs, figures["fig4"])
    explorer = build_entries(stems=sorted(hr_images), hr_images=hr_images, lr_dir=valid_dir / "lr",
                             sr_paths=_explorer_paths(figure_info, results_dir, baselines),
                             crop=min(crop_size, EXPLORER_CROP), grid=EXPLORER_GRID, max_images=EXPLORER_IMAGES)
    page = report_html(measured=measured, published=published, metrics=results, info=info, figures=figures,
                       profile=profile, seed=seed, crop_size=crop_size, explorer=explorer)
    atomic_write_text(out_dir / "index.html", page)
