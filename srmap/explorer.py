"""The report page's sample explorer: flip through SRMAP's samples, the L1 output, Bicubic and the ground truth
at the same crop and zoom, pick the crop by clicking the image, and see where the samples differ.

Self-contained and offline: every crop is a PNG data URI inside the page, and a
few lines of JavaScript switch between them. To keep the page small it holds,
per validation image (the first ``max_images`` by name), a downscaled preview
and a grid of up to ``grid`` x ``grid`` windows of ``crop`` HR pixels, each in
every view; a click on the preview selects the window under it. The spread view
is the per-pixel standard deviation across the SRMAP samples
(:func:`stochasticity_map`, also Figure 3's), scaled so the image's largest spread
is white.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from srmap.options import SCALE

PREVIEW_WIDTH = 320  # px of the clickable preview


@dataclass(frozen=True)
class View:
    """One thing to look at: a label and an HR-sized uint8 image (HxWx3, or HxW for the spread map)."""

    label: str
    image: np.ndarray


def _png_uri(img: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def windows(height: int, width: int, crop: int, grid: int) -> list[tuple[int, int]]:
    """(top, left) of up to ``grid`` x ``grid`` evenly spread ``crop``-px windows inside an HxW image.

    Positions are multiples of 4 (whole LR pixels); a dimension smaller than
    ``grid`` windows gets fewer. Raises ValueError when ``crop`` exceeds the image.
    """
    if crop > min(height, width) or crop < SCALE:
        raise ValueError(f"explorer: crop {crop} px does not fit a {height}x{width} image")

    def spread(n: int) -> list[int]:
        count = max(1, min(grid, n // crop))
        room = (n - crop) // SCALE
        return sorted({round(room * i / max(count - 1, 1)) * SCALE for i in range(count)})

    return [(t, left) for t in spread(height) for left in spread(width)]


def image_entry(stem: str, views: Sequence[View], preview_of: np.ndarray, *, crop: int, grid: int,
                start_view: int = 0) -> dict:
    """The explorer's data for one image: a preview of ``preview_of`` (uint8 HxWx3, the ground truth), the
    windows, per window one PNG URI per view, and where the panel opens: the window where the ground truth
    has the most texture (mean absolute finite difference), at view ``start_view``."""
    from PIL import Image

    gt = preview_of
    h, w = min(v.image.shape[0] for v in views), min(v.image.shape[1] for v in views)
    spots = windows(h, w, crop, grid)
    scale = min(1.0, PREVIEW_WIDTH / w)
    preview = np.asarray(Image.fromarray(gt[:h, :w]).resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                                             Image.BILINEAR))
    grey = gt[:h, :w].astype(np.float64).mean(axis=2)
    texture = [np.abs(np.diff(grey[t:t + crop, left:left + crop], axis=0)).mean()
               + np.abs(np.diff(grey[t:t + crop, left:left + crop], axis=1)).mean() for t, left in spots]
    return {"stem": stem, "height": h, "width": w, "crop": crop, "preview": _png_uri(preview),
            "start": [int(np.argmax(texture)), int(start_view)],
            "labels": [v.label for v in views], "windows": [[t, left] for t, left in spots],
            "crops": [[_png_uri(np.ascontiguousarray(v.image[t:t + crop, left:left + crop])) for v in views]
                      for t, left in spots]}


def stochasticity_map(samples: list[np.ndarray]) -> np.ndarray:
    """Per-pixel standard deviation across samples (uint8 HxWx3 each), averaged over RGB: float64 HxW in [0, 255]."""
    stack = np.stack([s.astype(np.float64) for s in samples])  # (S, H, W, 3)
    return stack.std(axis=0).mean(axis=2)


def spread_view(samples: Sequence[np.ndarray]) -> View:
    """The per-pixel std across ``samples`` (uint8 HxWx3 each) as a grey uint8 image, max spread = 255."""
    std = stochasticity_map(list(samples))
    peak = float(std.max())
    grey = np.zeros(std.shape, np.uint8) if peak == 0 else np.round(std / peak * 255).astype(np.uint8)
    return View(f"spread (std across {len(samples)} samples, white = {peak:.1f}/255)", grey)


def lr_view(lr: np.ndarray) -> View:
    """The LR input enlarged x4 by pixel repetition (nearest neighbour)."""
    return View("input LR (nearest x4)", np.repeat(np.repeat(lr, SCALE, 0), SCALE, 1))


def explorer_html(entries: Sequence[dict]) -> str:
    """The explorer section: a heading, one panel per image, the data as JSON, and the script that drives them."""
    if not entries:
        return ""
    panels = []
    for i, e in enumerate(entries):
        buttons = "".join(f'<button type="button" data-view="{k}">{html.escape(label)}</button>'
                          for k, label in enumerate(e["labels"]))
        panels.append(f"""<div class="explorer" id="explorer-{i}" data-image="{i}">
<h3>{html.escape(e["stem"])}</h3>
<div class="ex-row"><div class="ex-preview"><img class="ex-full" src="{e["preview"]}" alt="{html.escape(e["stem"])}:
click to choose the crop"><div class="ex-box"></div></div>
<div><img class="ex-shown" alt="selected view" src="{e["crops"][0][0]}">
<p class="ex-label"></p></div></div>
<div class="ex-buttons">{buttons}</div></div>""")
    data = json.dumps([{k: e[k] for k in ("height", "width", "crop", "labels", "windows", "crops", "start")}
                       for e in entries]).replace("</", "<\\/")
    return f"""<h2>Sample explorer</h2>
<p>Each SRMAP sample, the L1 output, Bicubic, the ground truth and the spread of the samples at the same crop and
zoom. Click a view's button or press the left/right arrow keys (after clicking a panel) to flip; click the
image on the left to move the crop (the nearest of the prepared windows).</p>
{''.join(panels)}
<script type="application/json" id="explorer-data">{data}</script>
<script>{_SCRIPT}</script>"""


EXPLORER_CSS = """.explorer{border:1px solid #ccc;padding:0.5em 1em;margin:1em 0}.ex-row{display:flex;gap:1.5em;
align-items:flex-start}.ex-preview{position:relative;cursor:crosshair}.ex-preview img{margin:0}
.ex-box{position:absolute;border:2px solid #e33;pointer-events:none}
.ex-shown{image-rendering:pixelated;width:384px;height:384px;margin:0}.ex-buttons button{margin:2px}
.ex-buttons button.on{background:#335;color:#fff}.ex-label{font-size:0.9em;color:#333}"""

# Shows view v of window w for panel i; buttons, arrow keys and clicks on the preview call it. Each panel opens
# at its entry's "start" (the most textured window, SRMAP sample 0). On load, a
# location hash "#explore=<i>:<v>" selects that view (what the browser test uses to flip without a mouse).
_SCRIPT = """(function(){
const data = JSON.parse(document.getElementById('explorer-data').textContent);
const state = data.map(() => ({w: 0, v: 0}));
function show(i, w, v) {
  const d = data[i], root = document.getElementById('explorer-' + i);
  v = (v + d.labels.length) % d.labels.length;
  state[i] = {w: w, v: v};
  const img = root.querySelector('.ex-shown');
  img.src = d.crops[w][v];
  img.dataset.view = v; img.dataset.window = w;
  root.querySelector('.ex-label').textContent = d.labels[v] + ' | window at row ' + d.windows[w][0] +
    ', col ' + d.windows[w][1] + ' (' + d.crop + ' px, shown x' + (384 / d.crop).toFixed(1) + ')';
  root.querySelectorAll('.ex-buttons button').forEach((b, k) => b.classList.toggle('on', k === v));
  const full = root.querySelector('.ex-full'), f = full.clientWidth / d.width, box = root.querySelector('.ex-box');
  box.style.left = d.windows[w][1] * f + 'px'; box.style.top = d.windows[w][0] * f + 'px';
  box.style.width = box.style.height = d.crop * f + 'px';
}
data.forEach((d, i) => {
  const root = document.getElementById('explorer-' + i);
  root.tabIndex = 0;
  root.querySelectorAll('.ex-buttons button').forEach((b, k) => b.addEventListener('click', () =>
    show(i, state[i].w, k)));
  root.addEventListener('keydown', (e) => {
    if (e.key === 'ArrowRight') show(i, state[i].w, state[i].v + 1);
    if (e.key === 'ArrowLeft') show(i, state[i].w, state[i].v - 1);
  });
  const full = root.querySelector('.ex-full');
  full.addEventListener('click', (e) => {
    const f = full.clientWidth / d.width, y = e.offsetY / f, x = e.offsetX / f;
    let best = 0, dist = Infinity;
    d.windows.forEach(([t, l], k) => {
      const dd = (t + d.crop / 2 - y) ** 2 + (l + d.crop / 2 - x) ** 2;
      if (dd < dist) { dist = dd; best = k; }
    });
    show(i, best, state[i].v);
  });
  const go = () => show(i, d.start[0], d.start[1]);
  if (full.complete) go(); else full.addEventListener('load', go);
});
const m = /#explore=(\\d+):(\\d+)(?::(\\d+))?/.exec(location.hash);
if (m && data[+m[1]]) show(+m[1], +(m[3] || 0), +m[2]);
})();"""


def build_entries(*, stems: Sequence[str], hr_images: dict, lr_dir: Path, sr_paths, crop: int, grid: int,
                  max_images: int) -> list[dict]:
    """Explorer entries for the first ``max_images`` of ``stems``.

    ``sr_paths(role, stem)`` returns the list of SR files of a method for an
    image (or raises FileNotFoundError when it has none), for the roles
    'bicubic' (optional), 'l1', 'srmap' (its samples) and 'srmap_projected'
    (optional); they are shown in that order after the LR and the ground
    truth, then the spread of the (plain) SRMAP samples. ``hr_images`` maps stems to uint8 HxWx3 ground truths.
    """
    from srmap.imageio import read_rgb8

    entries = []
    for stem in list(stems)[:max_images]:
        views = [lr_view(read_rgb8(Path(lr_dir) / f"{stem}.png")), View("ground truth", hr_images[stem])]
        try:
            views.append(View("Bicubic", read_rgb8(sr_paths("bicubic", stem)[0])))
        except (FileNotFoundError, ValueError):
            pass  # no baselines stage output: the explorer shows the rest
        views.append(View("Generator w/ L1", read_rgb8(sr_paths("l1", stem)[0])))
        samples = [read_rgb8(p) for p in sr_paths("srmap", stem)]
        first_sample = len(views)
        views += [View(f"SRMAP sample {k}", s) for k, s in enumerate(samples)]
        try:  # the projected samples, when evaluate.consistency includes "project"
            views += [View(f"SRMAP + projection, sample {k}", read_rgb8(p))
                      for k, p in enumerate(sr_paths("srmap_projected", stem))]
        except (FileNotFoundError, ValueError):
            pass
        if len(samples) > 1:
            h, w = min(s.shape[0] for s in samples), min(s.shape[1] for s in samples)
            views.append(spread_view([s[:h, :w] for s in samples]))
        size = min(int(crop), *(min(v.image.shape[:2]) for v in views)) // SCALE * SCALE
        entries.append(image_entry(stem, views, hr_images[stem], crop=size, grid=grid, start_view=first_sample))
    return entries
