"""dvc.yaml and the Snakefile must describe the same six stages: names, scripts, inputs and outputs."""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from conftest import ROOT, tool_env

STAGES = ["download", "degrade", "pretrain", "train_gan", "evaluate", "report"]


def dvc_stages(profile: str = "demo") -> dict[str, dict]:
    """Stages of dvc.yaml with `${profile}` substituted, as {name: {script, deps, outs}}.

    Outputs with `persist: true` are resume state (training checkpoints): Snakemake must not
    declare them, because it deletes the declared outputs of a failed or preempted job.
    """
    text = (ROOT / "dvc.yaml").read_text().replace("${profile}", profile)
    doc = yaml.safe_load(text)
    out = {}
    for name, st in doc["stages"].items():
        outs = set()
        for key in ("outs", "metrics", "plots"):
            for item in st.get(key, []):
                path, opts = (item, {}) if isinstance(item, str) else next(iter(item.items()))
                if not opts.get("persist"):
                    outs.add(path)
        script = re.search(r"python (pipeline/\w+\.py)", st["cmd"]).group(1)
        out[name] = {"script": script, "deps": set(st["deps"]), "outs": outs}
    return out


def snakemake_jobs(profile: str = "demo") -> dict[str, dict]:
    """Jobs of a forced dry run of the Snakefile, as {rule: {script, deps, outs}}."""
    proc = subprocess.run(["snakemake", "-n", "-p", "-F", "--nolock", "--cores", "1", "--config", f"profile={profile}"],
                          cwd=ROOT, env=tool_env(ROOT), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    jobs: dict[str, dict] = {}
    for block in re.split(r"\n(?=rule \w+:)", proc.stdout):
        m = re.match(r"rule (\w+):", block)
        if not m or m.group(1) == "all":
            continue
        field = lambda k: {s.strip() for s in re.search(rf"\n\s+{k}: (.*)", block).group(1).split(",")}  # noqa: E731
        script = re.search(r"(pipeline/\w+\.py) --profile " + profile, block).group(1)
        jobs[m.group(1)] = {"script": script, "deps": field("input"), "outs": field("output")}
    return jobs


@pytest.fixture(scope="module")
def both():
    return dvc_stages(), snakemake_jobs()


def test_same_stage_names_in_order(both):
    dvc, smk = both
    assert list(dvc) == STAGES
    assert sorted(smk) == sorted(STAGES)


@pytest.mark.parametrize("stage", STAGES)
def test_stage_matches(both, stage):
    dvc, smk = both
    assert dvc[stage]["script"] == smk[stage]["script"] == f"pipeline/{stage}.py"
    assert dvc[stage]["deps"] == smk[stage]["deps"], f"{stage}: inputs differ"
    assert dvc[stage]["outs"] == smk[stage]["outs"], f"{stage}: outputs differ"


def test_every_stage_tracks_its_params_with_dotted_keys():
    doc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for name, st in doc["stages"].items():
        assert st.get("params"), f"{name} declares no params"
        for key in st["params"]:
            assert key == "profile" or key.startswith("${profile}."), (name, key)


def test_profiles_write_disjoint_outputs():
    demo, paper = dvc_stages("demo"), dvc_stages("paper")
    outs_demo = set().union(*(s["outs"] for s in demo.values()))
    outs_paper = set().union(*(s["outs"] for s in paper.values()))
    assert not outs_demo & outs_paper


def test_dvc_dag_lists_the_six_stages():
    proc = subprocess.run(["dvc", "dag", "--dot"], cwd=ROOT, env=tool_env(ROOT), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    for stage in STAGES:
        assert f'"{stage}"' in proc.stdout
