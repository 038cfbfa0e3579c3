"""Stage `download`: fetch the HR images of the active profile.

Reads params `<profile>.data`. Writes `data/<profile>/hr/{train,valid}/*.png`.
demo: images that ship inside scikit-image (no network); paper: the official
DIV2K HR archives, verified against the sizes and checksums in srmap/div2k.json
(set SRMAP_DIV2K_ARCHIVES to a folder holding the zips to skip the download).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's srmap, even without pip install
from srmap.venv import use_project_venv  # noqa: E402

use_project_venv()  # `.venv/bin/dvc repro` without an activated venv still runs the stages there

from srmap.config import StageContext, stage_main  # noqa: E402
from srmap.utils import atomic_dir  # noqa: E402


def main(ctx: StageContext) -> None:
    data = ctx.params["data"]
    with atomic_dir(ctx.paths.hr) as tmp:
        if data["source"] == "skimage":
            from srmap.prepare import fetch_skimage

            for split in ("train", "valid"):
                fetch_skimage(list(data[split]), tmp / split, multiple=data["scale"])
        else:
            from srmap.download import download_div2k

            download_div2k(tmp, ids={"train": tuple(data["train"]), "valid": tuple(data["valid"])},
                           archives_dir=ctx.root / "data" / "archives", max_pixels=data["max_pixels"])
    print(f"download: HR images in {ctx.paths.hr}")


if __name__ == "__main__":
    stage_main("download", main)
