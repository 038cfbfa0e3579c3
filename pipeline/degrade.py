"""Stage `degrade`: make the x4 bicubic LR set (MATLAB-exact imresize, uint8).

Reads params `<profile>.data` and `<profile>.pretrain.lr_patch` (the smallest
usable training image). Reads `data/<profile>/hr`. Writes
`data/<profile>/prepared/train/{hr,lr}/*.npy` (decoded once, memory-mapped by
the patch sampler) and `data/<profile>/prepared/valid/{hr,lr}/*.png`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from srmap.venv import use_project_venv  # noqa: E402

use_project_venv()  # `.venv/bin/dvc repro` without an activated venv still runs the stages there

from srmap.config import StageContext, stage_main  # noqa: E402
from srmap.utils import atomic_dir  # noqa: E402


def main(ctx: StageContext) -> None:
    from srmap.prepare import degrade_split

    data = ctx.params["data"]
    common = dict(scale=data["scale"], workers=data["workers"], max_pixels=data["max_pixels"])
    with atomic_dir(ctx.paths.prepared) as tmp:
        n_train = degrade_split(ctx.paths.hr / "train", tmp / "train", fmt="npy",
                                min_hr_size=ctx.params["pretrain"]["lr_patch"] * data["scale"], **common)
        n_valid = degrade_split(ctx.paths.hr / "valid", tmp / "valid", fmt="png", **common)
    print(f"degrade: {len(n_train)} training and {len(n_valid)} validation pairs in {ctx.paths.prepared}")


if __name__ == "__main__":
    stage_main("degrade", main)
