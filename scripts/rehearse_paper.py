#!/usr/bin/env python3
"""Rehearse the `paper` profile end to end on this CPU before a GPU allocation is spent on it.

Runs download -> degrade -> pretrain -> train_gan -> baselines -> evaluate ->
report with the paper's full-size networks, its 135-pixel tile pad, bf16
autocast, channels-last, its DIV2K download code and its official-weights
baselines, but on stand-ins small enough for 2 CPU cores (docs/cluster.md,
"Paper-path rehearsal"):

* a throwaway clone of the committed HEAD in WORKDIR/srmap (the checkout you
  run it from is never touched);
* DIV2K stand-in archives, DIV2K_train_HR.zip and DIV2K_valid_HR.zip with
  DIV2K's member names and layout, built from scikit-image photographs
  (validation: 256x256 crops) and served over HTTP from 127.0.0.1; their sizes
  and SHA-256 reach the download stage through a rehearsal-only div2k.json
  ($SRMAP_DIV2K_JSON);
* fabricated RRDB and ESRGAN weights (random, at full size: 23 RRDBs of 64
  features, the original ESRGAN key layout) served the same way, with a
  rehearsal-only baselines.json ($SRMAP_BASELINES_JSON);
* step counts, batch sizes and the image ids cut with `dvc exp run -S`
  overrides (OVERRIDES below; --compile keeps torch.compile on as in the
  paper profile, at several minutes of warm-up per training stage).

It prints each stage's wall time and peak memory (the stages' own last
lines), the total, and the estimated memory per GPU of the real run
(srmap.cost, measured on the meta device): one GAN step at the paper's batch
and one tiled-evaluation forward on a 2040x1356 DIV2K image.

Usage:  .venv/bin/python scripts/rehearse_paper.py [--workdir DIR] [--compile] [--keep]
Exit status: 0 when every stage ran, 1 when one failed (its output is printed).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import http.server
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = ROOT / ".venv" / "bin"
sys.path.insert(0, str(ROOT))

# Stand-in DIV2K: ids -> scikit-image photograph; validation images are centre crops of this HR size.
TRAIN_IMAGES = {1: "astronaut", 2: "rocket", 3: "chelsea", 4: "immunohistochemistry"}
VALID_IMAGES = {801: "coffee", 802: "hubble_deep_field"}
VALID_CROP = 256
# What the rehearsal changes in the paper profile; everything else is the paper's.
OVERRIDES = [
    "profile=paper",
    "paper.data.train=[1,4]", "paper.data.valid=[801,802]", "paper.data.workers=2",
    "paper.pretrain.batch_size=2", "paper.pretrain.epochs=1", "paper.pretrain.iters_per_epoch=4",
    "paper.pretrain.ckpt_every=2", "paper.pretrain.log_every=1", "paper.pretrain.workers=2",
    "paper.train_gan.batch_size=2", "paper.train_gan.epochs=1", "paper.train_gan.iters_per_epoch=4",
    "paper.train_gan.ckpt_every=2", "paper.train_gan.log_every=1", "paper.train_gan.image_every=2",
    "paper.train_gan.workers=2",
]
NO_COMPILE = ["paper.pretrain.compile=false", "paper.train_gan.compile=false"]
DONE = re.compile(r"^srmap (\w+): done in ([\d.]+) s; (.*)$", re.M)
# The real run, for the memory estimate: DIV2K's largest validation size (x4 LR 510x339) at the paper's tile.
DIV2K_HR = (1356, 2040)


def sha256(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def png_bytes(rgb) -> bytes:
    """PNG encoding (Pillow) of a uint8 (H,W,3) array."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def stand_in_archives(out: Path) -> dict[str, bytes]:
    """DIV2K_train_HR.zip / DIV2K_valid_HR.zip holding <folder>/<id>.png from scikit-image; {name: bytes}."""
    import skimage.data

    files = {}
    for split, images, folder in (("train", TRAIN_IMAGES, "DIV2K_train_HR"), ("valid", VALID_IMAGES, "DIV2K_valid_HR")):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
            for i, name in images.items():
                rgb = getattr(skimage.data, name)()[..., :3]
                if split == "valid":
                    top, left = (rgb.shape[0] - VALID_CROP) // 2, (rgb.shape[1] - VALID_CROP) // 2
                    rgb = rgb[top:top + VALID_CROP, left:left + VALID_CROP]
                zf.writestr(f"{folder}/{i:04d}.png", png_bytes(rgb))
        files[f"{folder}.zip"] = buf.getvalue()
    for name, data in files.items():
        (out / name).write_bytes(data)
    return files


def fabricated_weights(out: Path) -> dict[str, bytes]:
    """Random full-size ESRGAN generators (23 RRDBs, 64 features) saved as the RRDB and ESRGAN files; {name: bytes}."""
    import torch
    from spandrel.architectures.ESRGAN import ESRGAN

    files = {}
    for seed, name in enumerate(("rehearsal-rrdb.pth", "rehearsal-esrgan.pth")):
        torch.manual_seed(seed)
        buf = io.BytesIO()
        torch.save(ESRGAN(num_filters=64, num_blocks=23, scale=4).state_dict(), buf)
        files[name] = buf.getvalue()
        (out / name).write_bytes(files[name])
    return files


def serve(folder: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """An HTTP server for ``folder`` on 127.0.0.1 (a free port) in a daemon thread; (server, base URL)."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:  # the stages print their own progress
            pass

    handler = functools.partial(Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def metadata(folder: Path, url: str, archives: dict[str, bytes], weights: dict[str, bytes]) -> dict[str, str]:
    """Write the rehearsal-only div2k.json and baselines.json; the environment that points the stages at them."""
    div2k = {"_source": "scripts/rehearse_paper.py: stand-in archives, NOT DIV2K"}
    for split, images in (("train", TRAIN_IMAGES), ("valid", VALID_IMAGES)):
        folder_name = f"DIV2K_{split}_HR"
        data = archives[f"{folder_name}.zip"]
        div2k[split] = {"url": f"{url}/{folder_name}.zip", "archive": f"{folder_name}.zip", "folder": folder_name,
                        "size": len(data), "sha256": sha256(data), "ids": [min(images), max(images)]}
    baselines = {"_source": "scripts/rehearse_paper.py: fabricated random weights, NOT the published ones"}
    for slug, label in (("rrdb", "RRDB"), ("esrgan", "ESRGAN")):
        name = f"rehearsal-{slug}.pth"
        baselines[slug] = {"label": label, "file": name, "url": f"{url}/{name}", "sha256": sha256(weights[name]),
                           "size": len(weights[name]), "source": "fabricated for the paper-path rehearsal"}
    (folder / "div2k.json").write_text(json.dumps(div2k, indent=1))
    (folder / "baselines.json").write_text(json.dumps(baselines, indent=1))
    from srmap import baselines as baselines_module, download

    return {download.METADATA_ENV: str(folder / "div2k.json"),
            baselines_module.METADATA_ENV: str(folder / "baselines.json")}


def memory_estimate() -> list[str]:
    """Lines estimating the real paper run's memory per GPU (srmap.cost on the meta device)."""
    import torch

    from srmap.config import load_params
    from srmap.cost import gan_step_cost, inference_memory
    from srmap.options import SCALE, CriticConfig, GeneratorConfig, from_params

    _, p = load_params(ROOT / "params.yaml", "paper")
    g_cfg = from_params(GeneratorConfig, p["model"]["generator"], "paper.model.generator")
    d_cfg = from_params(CriticConfig, p["model"]["critic"], "paper.model.critic")
    tg, ev = p["train_gan"], p["evaluate"]
    gpus = max(1, int(p["resources"]["train_gan"]["gpus"]))
    half, patch = tg["batch_size"] // 2 // gpus, tg["lr_patch"]
    gib = 2 ** 30
    costs = {what: gan_step_cost(g_cfg, d_cfg, half=half, lr_patch=patch, dtype=dtype)
             for dtype, what in ((torch.float32, "float32"), (torch.bfloat16, "bf16 activations (amp: true)"))}
    flops = costs["float32"].flops
    steps = tg["epochs"] * tg["iters_per_epoch"]
    lines = [f"paper GAN step per GPU ({gpus} GPU(s), {half} patches per half-batch, LR patch {patch}): "
             f"{flops / 1e12:.1f} TFLOP measured on the meta device; {steps * flops * gpus / 1e18:.0f} EFLOP for "
             f"the stage's {steps} steps"]
    for what, m in costs.items():
        lines.append(f"  memory, {what}: {m.total / gib:.1f} GiB = states {m.states / gib:.1f} + max(critic step "
                     f"{m.critic_step / gib:.1f}, generator step {m.generator_step / gib:.1f})")
    lr_h, lr_w = DIV2K_HR[0] // SCALE, DIV2K_HR[1] // SCALE
    tile, pad = int(ev["tile"]), int(ev["tile_pad"])
    th, tw = (min(tile + 2 * pad, lr_h), min(tile + 2 * pad, lr_w)) if tile else (lr_h, lr_w)
    mem = inference_memory(g_cfg, th, tw)
    lines.append(f"tiled evaluation of a {DIV2K_HR[1]}x{DIV2K_HR[0]} DIV2K image (LR {lr_w}x{lr_h}, tile {tile}, pad "
                 f"{pad}: largest padded tile {tw}x{th}): {mem / gib:.1f} GiB float32 for the generator forward")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See docs/cluster.md.")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/srmap-rehearsal"),
                    help="where the clone, stand-ins and server files go (default %(default)s; emptied first)")
    ap.add_argument("--compile", action="store_true", help="keep the paper profile's torch.compile on")
    ap.add_argument("--keep", action="store_true", help="keep WORKDIR afterwards (default: delete it on success)")
    args = ap.parse_args()
    work = args.workdir.resolve()
    if work.exists():
        if not (work / ".srmap-rehearsal").exists():
            ap.error(f"--workdir {work} exists and was not made by this script; choose another")
        shutil.rmtree(work)
    (work / "served").mkdir(parents=True)
    (work / ".srmap-rehearsal").touch()
    t0 = time.monotonic()
    clone = work / "srmap"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    archives, weights = stand_in_archives(work / "served"), fabricated_weights(work / "served")
    server, url = serve(work / "served")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(metadata(work, url, archives, weights), PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
               PYTHONPATH=str(clone), GIT_AUTHOR_NAME="rehearsal", GIT_AUTHOR_EMAIL="rehearsal@localhost",
               GIT_COMMITTER_NAME="rehearsal", GIT_COMMITTER_EMAIL="rehearsal@localhost")
    overrides = OVERRIDES + ([] if args.compile else NO_COMPILE)
    cmd = ["dvc", "exp", "run", *[a for o in overrides for a in ("-S", o)]]
    print("$ " + " ".join(cmd), flush=True)
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=clone, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.monotonic() - started
    server.shutdown()
    (work / "rehearsal.log").write_text(proc.stdout)
    if proc.returncode != 0:
        print(proc.stdout[-6000:])
        print(f"rehearsal FAILED (dvc exp run exit {proc.returncode}) after {wall:.0f} s; log: "
              f"{work / 'rehearsal.log'}")
        return 1
    print(f"\n{'stage':<10} {'wall':>8}  memory (the stage's last line)")
    for stage, seconds, memory in DONE.findall(proc.stdout):
        print(f"{stage:<10} {float(seconds):>7.1f}s  {memory}")
    print(f"{'total':<10} {wall:>7.1f}s  (dvc exp run; {time.monotonic() - t0:.0f} s with the clone and stand-ins)")
    table = clone / "reports" / "paper" / "table2.md"
    print("\nTable 2 of the rehearsal (random baselines, 4 training images: only the plumbing is meaningful):\n"
          + "\n".join(line for line in table.read_text().splitlines() if line.startswith("|")))
    print("\nEstimated memory per GPU of the real paper run (srmap.cost, meta device):")
    print("\n".join(memory_estimate()))
    if not args.keep:
        shutil.rmtree(work)
    else:
        print(f"\nkept {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
