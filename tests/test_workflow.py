"""dvc.yaml and the Snakefile must describe the same seven stages: names, scripts, inputs, outputs and
tracked params; their code deps are each stage script's import closure; their outputs are the paths the
stage scripts write (srmap.config.Paths); and resources stay out of what DVC tracks."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, tool_env
from srmap.config import STAGES, Paths
from srmap.utils import import_closure



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
    assert list(dvc) == list(STAGES)  # srmap.config.STAGES, the one list
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
    outs = {name: set().union(*(s["outs"] for s in dvc_stages(name).values())) for name in ("demo", "study", "paper")}
    assert not outs["demo"] & outs["paper"] and not outs["demo"] & outs["study"] and not outs["study"] & outs["paper"]


# Who feeds whom: every path a stage reads that another stage writes.
EDGES = {("download", "degrade"), ("degrade", "pretrain"), ("degrade", "train_gan"), ("pretrain", "train_gan"),
         ("degrade", "baselines"), ("degrade", "evaluate"), ("pretrain", "evaluate"), ("train_gan", "evaluate"),
         ("degrade", "report"), ("pretrain", "report"), ("train_gan", "report"), ("baselines", "report"),
         ("evaluate", "report")}


def test_dvc_dag_has_the_seven_stages_and_their_edges():
    proc = subprocess.run(["dvc", "dag", "--dot"], cwd=ROOT, env=tool_env(ROOT), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    nodes = set(re.findall(r'^\s*"(\w+)";?$', proc.stdout, re.M))
    edges = set(re.findall(r'"(\w+)" -> "(\w+)"', proc.stdout))
    assert nodes == set(STAGES) and len(STAGES) == 7
    assert edges == EDGES


# ------------------------------------------------------------------ code deps (import closure)

def srmap_code(paths) -> set[str]:
    return {p for p in paths if p.startswith("srmap/") and p.endswith(".py")}


@pytest.mark.parametrize("stage", STAGES)
def test_code_deps_are_the_scripts_import_closure(both, stage):
    closure = {str(p.relative_to(ROOT)) for p in import_closure(ROOT / "pipeline" / f"{stage}.py")}
    assert "srmap/config.py" in closure  # every stage script validates params.yaml through it
    dvc, smk = both
    assert srmap_code(dvc[stage]["deps"]) == closure, f"dvc.yaml {stage}: srmap deps != import closure"
    assert srmap_code(smk[stage]["deps"]) == closure, f"Snakefile {stage}: srmap deps != import closure"


def test_import_closure_follows_lazy_and_transitive_imports(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("import os\nfrom srmap import utils\n\ndef f():\n    from srmap.evaluate import evaluate_stage\n")
    names = {p.name for p in import_closure(script)}
    assert {"utils.py", "evaluate.py", "metrics.py"} <= names  # evaluate -> metrics
    assert "train.py" not in names and "cli.py" not in names


def test_training_fingerprint_covers_exactly_declared_code(both):
    """srmap.train.code_fingerprint hashes train.py and its import closure; each training stage declares
    all of it, so a change that invalidates a checkpoint also re-runs the stage (and vice versa for
    everything but the stage's own plumbing: config, tracking, venv)."""
    fingerprinted = {"srmap/train.py"} | {str(p.relative_to(ROOT)) for p in import_closure(ROOT / "srmap/train.py")}
    dvc, smk = both
    for stage in ("pretrain", "train_gan"):
        declared = srmap_code(dvc[stage]["deps"])
        assert fingerprinted <= declared, (stage, fingerprinted - declared)
        assert declared - fingerprinted <= {"srmap/config.py", "srmap/tracking.py", "srmap/venv.py"}, stage


def test_code_fingerprint_changes_with_training_code_only(tmp_path, monkeypatch):
    """code_fingerprint itself, on a copy of the package: an edit to a module training imports changes it,
    an edit to the inference side (srmap upscale, the spandrel loader) does not."""
    from srmap import resume, utils

    pkg = tmp_path / "srmap"
    shutil.copytree(ROOT / "srmap", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(resume, "__file__", str(pkg / "resume.py"))
    monkeypatch.setattr(utils, "__file__", str(pkg / "utils.py"))
    before = resume.code_fingerprint()
    for name in ("inference.py", "loaders.py", "cli.py"):
        (pkg / name).write_text((pkg / name).read_text() + "\n# an edit outside training\n")
        assert resume.code_fingerprint() == before, name
    (pkg / "nets.py").write_text((pkg / "nets.py").read_text() + "\n# an edit to the networks\n")
    assert resume.code_fingerprint() != before


def test_srmap_has_no_import_cycle():
    """No module reaches itself through its imports, lazy imports inside functions included."""
    for module in sorted((ROOT / "srmap").glob("*.py")):
        closure = import_closure(module)
        assert module.resolve() not in closure, f"{module.name} imports itself through {[p.name for p in closure]}"
    training = {p.name for p in import_closure(ROOT / "srmap" / "train.py")}
    assert not training & {"inference.py", "loaders.py", "cli.py", "evaluate.py"}, training


# ------------------------------------------------------------------ paths: Paths vs both engines

def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _stage_paths(script: Path) -> set[str]:
    """Relative paths a stage script spells from ``ctx.paths.<attr>`` / ``ctx.root`` joined with
    string literals by ``/`` (resolved for the demo profile)."""
    paths = Paths(ROOT, "demo")

    def value(node):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) \
                and node.value.attr == "paths" and isinstance(node.value.value, ast.Name):
            return getattr(paths, node.attr)
        if isinstance(node, ast.Attribute) and node.attr == "root" and isinstance(node.value, ast.Name):
            return ROOT
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant):
            left = value(node.left)
            return None if left is None else left / node.right.value
        return None

    found = set()
    for node in ast.walk(ast.parse(script.read_text())):
        v = value(node)
        if v is not None and v != ROOT:
            found.add(_rel(v))
    return found


def _related(path: str, declared: set[str]) -> bool:
    """``path`` is a declared path, lies inside one, or is the folder of one."""
    return any(path == d or path.startswith(d + "/") or d.startswith(path + "/") for d in declared)


# Paths a stage reads that no engine declares, and why.
UNDECLARED = {"data/archives": "optional hand-placed DIV2K zips; verified against srmap/div2k.json instead",
              "models/baselines": "official baseline weights, fetched or hand-placed; verified against "
                                  "srmap/baselines.json (a dep) instead"}


@pytest.mark.parametrize("stage", STAGES)
def test_stage_scripts_only_touch_declared_paths(both, stage):
    dvc, smk = both
    persist = {p for p in _all_dvc_outs()[stage] if p not in dvc[stage]["outs"]}  # resume state
    used = _stage_paths(ROOT / "pipeline" / f"{stage}.py")
    assert used, stage
    for engine, st in (("dvc.yaml", dvc[stage]), ("Snakefile", smk[stage])):
        declared = st["deps"] | st["outs"] | persist
        bad = {p for p in used if not _related(p, declared) and p not in UNDECLARED}
        assert not bad, f"pipeline/{stage}.py uses {sorted(bad)}, which {engine} does not declare for {stage}"


def test_paths_name_the_declared_outputs(both):
    """Every output folder Paths names is a declared out, or holds declared outs, of exactly one stage in
    both engines; every declared out lies under something Paths names."""
    paths = Paths(ROOT, "demo")
    names = [a for a, v in vars(Paths).items() if isinstance(v, property)]
    assert set(names) == {"hr", "prepared", "pretrain", "train_gan", "baselines", "results", "report"}
    named = {a: _rel(getattr(paths, a)) for a in names}

    def owner_attr(out: str) -> str:
        """The most specific Paths folder holding ``out`` (results/demo/baselines/... is Paths.baselines')."""
        return max((a for a, r in named.items() if out == r or out.startswith(r + "/")), key=lambda a: len(named[a]))

    for engine, stages in zip(("dvc.yaml", "Snakefile"), both):
        for attr, rel in named.items():
            owners = [s for s, st in stages.items() if any(owner_attr(o) == attr for o in st["outs"])]
            assert len(owners) == 1, f"{engine}: Paths.{attr} ({rel}) is written by {owners or 'no stage'}"
        for stage, st in stages.items():
            for out in st["outs"]:
                assert any(out == r or out.startswith(r + "/") for r in named.values()), (engine, stage, out)


def _all_dvc_outs(profile: str = "demo") -> dict[str, set[str]]:
    """Every out of every dvc.yaml stage, persistent (resume-state) ones included."""
    doc = yaml.safe_load((ROOT / "dvc.yaml").read_text().replace("${profile}", profile))
    return {name: {item if isinstance(item, str) else next(iter(item)) for key in ("outs", "metrics", "plots")
                   for item in st.get(key, [])} for name, st in doc["stages"].items()}


# ------------------------------------------------------------------ params and resources

def test_snakefile_rules_track_their_dvc_stages_params():
    text = (ROOT / "Snakefile").read_text()
    for stage in STAGES:
        block = re.search(rf"\nrule {stage}:\n(.*?)(?=\nrule |\Z)", text, re.S).group(1)
        assert re.search(rf'\n        tracked=tracked\("{stage}"\),\n', block), f"rule {stage}: params.tracked"


SNAKEMAKE_RULES = """
import json, sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings, StorageSettings

# Load the workflow (no DAG, no jobs) and print each rule's tracked params and resources.
# Uses the workflow object behind the API: pinned snakemake 9.27.1.
with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
    wf = api.workflow(resource_settings=ResourceSettings(cores=1), config_settings=ConfigSettings(),
                      storage_settings=StorageSettings(), snakefile=Path("Snakefile"), workdir=Path("."))
    rules = {}
    for r in wf._workflow.rules:
        if r.name == "all":
            continue
        res = {k: r.resources[k].value if hasattr(r.resources[k], "value") else r.resources[k]
               for k in ("cpus_per_task", "mem_mb", "runtime", "gpu") if k in r.resources}
        rules[r.name] = {"tracked": r.params.get("tracked"), "resources": res}
json.dump(rules, sys.stdout)
"""


def _placeholder(path: Path) -> None:
    """A stand-in for a stage output: a file, or a folder holding one file (no suffix = folder)."""
    if path.suffix:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}\n" if path.suffix == ".json" else "step\n" if path.suffix == ".csv" else "x\n")
    else:
        path.mkdir(parents=True, exist_ok=True)
        (path / "placeholder").write_text("x\n")


@pytest.fixture(scope="module")
def committed(tmp_path_factory) -> Path:
    """A copy of the working tree in which every demo stage's outputs exist (placeholders) and
    `dvc commit -f` has recorded them in dvc.lock, as after a finished `dvc repro`."""
    tree = tmp_path_factory.mktemp("lock") / "srmap"
    files = subprocess.run(["git", "ls-files", "-z", "-c", "-o", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        if (ROOT / rel).is_file():
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, tree / rel)
    (tree / "dvc.lock").unlink(missing_ok=True)
    for outs in _all_dvc_outs().values():
        for out in outs:
            _placeholder(tree / out)
    env = tool_env(tree)
    for cmd in (["dvc", "config", "--local", "core.no_scm", "true"], ["dvc", "commit", "-f", "-q"]):
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
    assert _dvc_status(tree) == {}
    return tree


def _dvc_status(tree: Path) -> dict:
    proc = subprocess.run(["dvc", "status", "--json"], cwd=tree, env=tool_env(tree), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout or "{}")


def _snakemake_rules(tree: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", SNAKEMAKE_RULES], cwd=tree, env=tool_env(tree),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_both_engines_track_the_same_params(committed):
    """The keys and values DVC recorded per stage (dvc.lock) are exactly what each Snakemake rule tracks."""
    lock = yaml.safe_load((committed / "dvc.lock").read_text())["stages"]
    rules = _snakemake_rules(committed)
    assert sorted(rules) == sorted(STAGES)
    for stage in STAGES:
        dvc_params = lock[stage]["params"]["params.yaml"]
        assert rules[stage]["tracked"] == dvc_params, stage
    assert "demo.data.workers" in lock["degrade"]["params"]["params.yaml"]
    assert "demo.data.workers" not in lock["download"]["params"]["params.yaml"]


def test_resource_edits_leave_dvc_status_clean(committed):
    """Editing every resource value leaves every DVC stage up to date, while the Snakefile picks the
    new values up; editing a tracked value marks exactly its stage changed."""
    params_path = committed / "params.yaml"
    original = params_path.read_text()
    doc = yaml.safe_load(original)
    try:
        resources = doc["demo"]["resources"]
        for stage in resources:
            resources[stage] = {k: v + 3 for k, v in resources[stage].items()}
        params_path.write_text(yaml.safe_dump(doc))
        assert _dvc_status(committed) == {}
        rules = _snakemake_rules(committed)
        for stage, r in resources.items():
            got = rules[stage]["resources"]
            assert (got["cpus_per_task"], got["mem_mb"], got["runtime"], got.get("gpu")) == \
                (r["cpus"], r["mem_mb"], r["runtime"], r["gpus"]), stage
        doc["demo"]["evaluate"]["samples"] += 1  # control: a tracked value
        params_path.write_text(yaml.safe_dump(doc))
        changed = _dvc_status(committed)
        assert set(changed) == {"evaluate"}, changed
    finally:
        params_path.write_text(original)


def test_conda_env_installs_the_lock():
    """Every rule names envs/srmap.yaml (snakemake --lint wants software per rule); it must install
    exactly requirements.lock on a Python the package supports."""
    env = yaml.safe_load((ROOT / "envs" / "srmap.yaml").read_text())
    deps = env["dependencies"]
    python = next(d for d in deps if isinstance(d, str) and d.startswith("python="))
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    assert pip == ["-r ../requirements.lock"] and (ROOT / "envs" / "../requirements.lock").is_file()
    floor = re.search(r'requires-python = ">=([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert tuple(map(int, python.split("=")[1].split("."))) >= tuple(map(int, floor.split(".")))
    text = (ROOT / "Snakefile").read_text()
    assert 'CONDA_ENV = "envs/srmap.yaml"' in text
    assert text.count("\n    conda:\n        CONDA_ENV\n") == len(STAGES)


def test_readme_layout_lists_every_module():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    layout = layout.split("\n## ")[0]
    listed = set(re.findall(r"^\| `srmap/([\w.]+)` \|", layout, re.M))
    on_disk = {p.name for p in (ROOT / "srmap").iterdir() if p.is_file() and p.suffix in (".py", ".csv", ".json")}
    assert listed == on_disk, (on_disk - listed, listed - on_disk)
