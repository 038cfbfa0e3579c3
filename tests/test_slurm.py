"""SLURM: `snakemake --profile slurm` runs the demo on a one-node cluster on 127.0.0.1.

The end-to-end tests (marked `slurm`) start a private cluster with
scripts/slurm-local.sh (root and apt-get needed; skipped with the reason when
impossible, a failure under CI=true), run the demo in a fresh clone, check that
every rule ran as its own SLURM job, that the report equals the `dvc repro`
run's, and that `dvc commit -f` makes a following `dvc repro` run nothing. The
other tests need no cluster: profile hygiene, GPU requests and the torchrun
launcher rendered by `snakemake -n -p`, and slurm-local.sh's argument checks.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import ROOT, VENV_BIN, clone_repo, edit_params, tool_env
from srmap.config import STAGES

SCRIPT = ROOT / "scripts" / "slurm-local.sh"
RULES = STAGES  # every stage is a Snakemake rule
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
# The SLURM run gets this long before `timeout` kills it (SIGTERM does not stop
# a snakemake that waits on jobs, hence -k); the demo itself takes a few minutes.
SLURM_RUN_TIMEOUT_S = 1500


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout_s: int) -> subprocess.CompletedProcess:
    """Run `cmd` under `timeout -k 30 <timeout_s>`; stdout and stderr merged into .stdout."""
    return subprocess.run(["timeout", "-k", "30", str(timeout_s), *cmd], cwd=cwd, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def tail(text: str, n: int = 6000) -> str:
    """The last `n` characters of a command's output, for assertion messages."""
    return text[-n:]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_worktree(dest: Path) -> Path:
    """Tracked and untracked-but-not-ignored files of the working tree, so dry runs see
    the current Snakefile without touching the repository's own .snakemake/."""
    files = subprocess.run(["git", "ls-files", "-z", "-c", "-o", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file() or src.is_symlink():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel, follow_symlinks=False)
    return dest


# ---------------------------------------------------------------- no cluster needed

def profile_keys(name: str) -> dict:
    """profiles/<name>/config.yaml as a dict."""
    return yaml.safe_load((ROOT / "profiles" / name / "config.yaml").read_text())


def test_profiles_do_not_fight():
    # profiles/default is loaded on top of --profile slurm and wins key by key.
    slurm, default = profile_keys("slurm"), profile_keys("default")
    assert slurm["executor"] == "slurm"
    assert default.get("cores") == "all" and "executor" not in default
    assert not set(slurm) & set(default), f"keys in both profiles: {set(slurm) & set(default)}"
    # site-specific settings stay commented out for users to fill in
    assert not {"slurm_partition", "slurm_account"} & set(slurm["default-resources"])
    assert re.search(r"^\s*#\s*slurm_partition:", (ROOT / "profiles/slurm/config.yaml").read_text(), re.M)
    assert re.search(r"^\s*#\s*slurm_account:", (ROOT / "profiles/slurm/config.yaml").read_text(), re.M)
    # the plugin trusts squeue only if MinJobAge >= 3 x init seconds; slurm-local.sh must satisfy it
    min_job_age = int(re.search(r"^MinJobAge=(\d+)", SCRIPT.read_text(), re.M).group(1))
    assert slurm["slurm-status-command"] == "squeue"
    assert min_job_age >= 3 * slurm["slurm-init-seconds-before-status-checks"]


def test_profile_name_resolves_from_repo_root(tmp_path):
    # snakemake looks for `--profile NAME` in ./NAME, ~/.config/snakemake and
    # /etc/xdg/snakemake only, so the repository needs ./slurm -> profiles/slurm.
    tree = copy_worktree(tmp_path)
    proc = run([str(VENV_BIN / "snakemake"), "--profile", "slurm", "-n", "--nolock"], tree, tool_env(tree), 300)
    assert "profile directory given (slurm)" not in proc.stdout, tail(proc.stdout)
    assert proc.returncode == 0, tail(proc.stdout)
    assert "Using profiles slurm and workflow specific profile" in proc.stdout


def dry_run_jobs(tree: Path, gpus: int | None) -> dict[str, str]:
    """`snakemake --profile profiles/slurm -n -p` of the training rules, with the demo's
    pretrain/train_gan GPU count overridden when `gpus` is given; {rule: printed block}."""
    cmd = [str(VENV_BIN / "snakemake"), "--profile", "profiles/slurm", "-n", "-p", "-F", "--nolock"]
    if gpus is not None:
        override = tree / f"gpus{gpus}.yaml"
        gpu_counts = {s: {"gpus": gpus} for s in ("pretrain", "train_gan")}
        override.write_text(yaml.safe_dump({"demo": {"resources": gpu_counts}}))
        cmd.append(f"--configfile={override}")
    cmd += ["--", "models/demo/train_gan/generator.pt"]
    proc = run(cmd, tree, tool_env(tree), 300)
    assert proc.returncode == 0, tail(proc.stdout)
    blocks = re.split(r"\n(?=(?:local)?rule \w+:)", proc.stdout)
    jobs = {re.match(r"(?:local)?rule (\w+):", b).group(1): b for b in blocks if re.match(r"(?:local)?rule \w+:", b)}
    assert {"pretrain", "train_gan"} <= set(jobs), tail(proc.stdout)
    return jobs


@pytest.mark.parametrize("gpus", [None, 1, 4])
def test_training_launcher_and_gpu_request(tmp_path, gpus):
    jobs = dry_run_jobs(copy_worktree(tmp_path), gpus)
    for rule in ("pretrain", "train_gan"):
        block = jobs[rule]
        resources = re.search(r"resources: (.*)", block).group(1)
        shell = re.search(r"Shell command: (.*)", block).group(1)
        if gpus is None:  # the demo as shipped: CPU only, so it runs on CPU-only clusters
            assert not re.search(r"\bgpu=", resources), resources
        else:
            assert f"gpu={gpus}" in resources.split(", "), resources
        if gpus == 4:
            assert f"torchrun --standalone --nproc_per_node=4 pipeline/{rule}.py --profile demo" in shell, shell
        else:
            assert "torchrun" not in shell and f"python pipeline/{rule}.py --profile demo" in shell, shell


def test_plugin_turns_gpu_resource_into_sbatch_gpus():
    # The Snakefile requests GPUs through the resource `gpu`; pin what plugin 2.8.0 makes of it.
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    class Resources(dict):
        __getattr__ = dict.__getitem__

    class Job:
        def __init__(self, **res):
            self.resources = Resources(res)

    assert set_gres_string(Job(gpu=4)).strip() == "--gpus=4"
    assert set_gres_string(Job(gpu=2, gpu_model="a100")).strip() == "--gpus=a100:2"
    assert set_gres_string(Job(cpus_per_task=2)) == ""


def test_slurm_local_rejects_bad_arguments(tmp_path):
    for args, msg in ((["bogus"], "unknown command 'bogus'"),
                      (["up", "--colour"], "unknown argument '--colour'"),
                      (["down", "--state-dir", "/"], "too close to /")):
        proc = run([str(SCRIPT), *args], tmp_path, dict(os.environ), 30)
        assert proc.returncode != 0 and msg in proc.stdout, (args, proc.stdout)
    proc = run([str(SCRIPT), "down", "--state-dir", str(tmp_path / "never-up")], tmp_path, dict(os.environ), 30)
    assert proc.returncode == 0 and "nothing to stop" in proc.stdout, proc.stdout


# ------------------------------------------------------------ local SLURM cluster

def cannot_start_reason() -> str | None:
    """Why scripts/slurm-local.sh cannot work here, or None if it should."""
    if os.name != "posix" or not Path("/proc/self/exe").exists():
        return "needs Linux"
    if os.geteuid() != 0:
        return "needs root to start munged/slurmctld/slurmd (scripts/slurm-local.sh up)"
    if not Path("/usr/sbin/slurmctld").exists() and shutil.which("apt-get") is None:
        return "slurm-wlm is not installed and apt-get is not available to install it"
    return None


def skip_or_fail(reason: str):
    """Missing SLURM is fine on a laptop but must not pass silently in CI."""
    if IN_CI:
        pytest.fail(f"CI=true but the local SLURM cluster cannot run: {reason}")
    pytest.skip(reason)


class Cluster:
    """A running private cluster: its state dir and the environment that reaches it."""

    def __init__(self, state: Path, ports: dict[str, str]):
        self.state = state
        self.ports = ports
        self.conf = state / "etc" / "slurm.conf"

    def env(self, root: Path | None = None) -> dict[str, str]:
        """tool_env for `root` plus SLURM_CONF (for client commands) and the cluster's ports."""
        return tool_env(root, SLURM_CONF=str(self.conf), **self.ports)

    def script(self, *args: str, timeout_s: int = 120) -> subprocess.CompletedProcess:
        """Run scripts/slurm-local.sh with `args` on this cluster's state dir."""
        return run([str(SCRIPT), *args, "--state-dir", str(self.state)], ROOT, self.env(), timeout_s)

    def pids(self) -> dict[str, int]:
        """{daemon: pid} from the PID files that exist."""
        files = {"munged": self.state / "munge" / "munged.pid", "slurmctld": self.state / "run" / "slurmctld.pid",
                 "slurmd": self.state / "run" / "slurmd.pid"}
        return {k: int(f.read_text()) for k, f in files.items() if f.exists()}


def start_cluster(state: Path) -> Cluster:
    """`up` a cluster in `state`; skips (fails under CI) when that is impossible."""
    reason = cannot_start_reason()
    if reason:
        skip_or_fail(reason)
    # Free ports: the default 6817/6818 may be taken by something else on this machine.
    cluster = Cluster(state, {"SRMAP_SLURM_CTLD_PORT": str(free_port()), "SRMAP_SLURM_SLURMD_PORT": str(free_port())})
    proc = cluster.script("up", timeout_s=900)  # may apt-get install slurm-wlm munge first
    if proc.returncode != 0:
        cluster.script("down", "--purge")
        skip_or_fail(f"scripts/slurm-local.sh up failed:\n{tail(proc.stdout, 3000)}")
    return cluster


def state_dir(tag: str) -> Path:
    """A fresh state dir directly under /tmp: munged runs as user munge and cannot enter
    pytest's 0700 temp dirs, and the munge socket path must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix=f"srmap-{tag}-", dir="/tmp"))
    path.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def cluster():
    """The module's cluster, torn down (and its state dir deleted) however the tests end."""
    c = start_cluster(state_dir("slurm"))
    try:
        yield c
    finally:
        c.script("down", "--purge")


@pytest.fixture(scope="module")
def slurm_run(cluster, tmp_path_factory):
    """A fresh clone on which `snakemake --profile slurm` ran the demo through the cluster."""
    clone = clone_repo(Path(tmp_path_factory.mktemp("slurm-e2e")) / "srmap")
    t0 = time.monotonic()
    # Snakemake exports OMP_NUM_THREADS=<rule threads> to each job while `dvc repro`
    # passes on the caller's; give every rule the reference run's thread count so
    # both runs do the same float arithmetic and their reports can be compared.
    threads = tool_env()["OMP_NUM_THREADS"]
    # Poll every 5 s instead of the profile's 60 s: jobs here are short and the
    # cluster keeps finished jobs in squeue for 3600 s (>= 3 x 5).
    proc = run([str(VENV_BIN / "snakemake"), "--profile", "slurm", "--set-threads", *[f"{r}={threads}" for r in RULES],
                "--slurm-init-seconds-before-status-checks", "5"],
               clone, cluster.env(clone), SLURM_RUN_TIMEOUT_S)
    (clone / "slurm-run.log").write_text(proc.stdout)
    jobs = run(["squeue", "--states=all", "--format=%i|%T|%k|%S|%e|%M"], ROOT, cluster.env(), 60)
    (clone / "slurm-jobs.txt").write_text(jobs.stdout)  # per-job start/end, for debugging and timing
    assert proc.returncode == 0, f"snakemake --profile slurm failed (rc {proc.returncode}):\n{tail(proc.stdout)}"
    print(f"demo through SLURM: {time.monotonic() - t0:.0f} s wall")
    return clone


def squeue_records(cluster: Cluster) -> dict[str, tuple[str, str]]:
    """{job id: (state, comment)} of every job the cluster still lists (MinJobAge=3600)."""
    proc = run(["squeue", "--states=all", "--noheader", "--format=%i|%T|%k"], ROOT, cluster.env(), 60)
    assert proc.returncode == 0, proc.stdout
    return {i: (s, k) for i, s, k in (line.split("|", 2) for line in proc.stdout.split("\n") if line.strip())}


@pytest.mark.slurm
def test_down_stops_a_half_up_cluster():
    # Runs before the module's `cluster` fixture starts: one local cluster at a time.
    c = start_cluster(state_dir("slurm-half"))
    try:
        pids = c.pids()
        os.kill(pids["slurmd"], 9)  # a crashed node daemon: only munged and slurmctld remain
        proc = c.script("down")
        assert proc.returncode == 0, proc.stdout
        deadline = time.monotonic() + 20
        # /proc/PID/exe disappears at exit, even for an unreaped zombie
        while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}/exe") for p in pids.values()):
            time.sleep(0.2)
        assert not [n for n, p in pids.items() if os.path.exists(f"/proc/{p}/exe")], "daemons still running"
    finally:
        c.script("down", "--purge")
    assert not c.state.exists()


@pytest.mark.slurm
def test_up_is_idempotent(cluster):
    before = cluster.pids()
    assert set(before) == {"munged", "slurmctld", "slurmd"}
    proc = cluster.script("up")
    assert proc.returncode == 0, proc.stdout
    assert cluster.pids() == before, "a second `up` must not start new daemons"
    state = run(["sinfo", "-h", "-N", "-o", "%T"], ROOT, cluster.env(), 30).stdout.split()
    assert state and state[0] in ("idle", "mixed", "allocated"), state


@pytest.mark.slurm
def test_every_rule_ran_as_its_own_slurm_job(slurm_run, cluster):
    records = squeue_records(cluster)
    seen = set()
    for rule in RULES:
        # The executor's per-job log, kept by slurm-keep-successful-logs: rule_<rule>/<jobid>.log
        logs = sorted((slurm_run / ".snakemake" / "slurm_logs" / f"rule_{rule}").glob("*.log"))
        assert len(logs) == 1, (rule, logs)
        job_id = logs[0].stem
        # ... and the rule's own log, written inside the job
        rule_log = (slurm_run / "logs" / "demo" / f"{rule}.log").read_text()
        assert re.search(rf"\bSLURM_JOB_ID={job_id}\b", rule_log), (rule, job_id, rule_log[:300])
        # ... and SLURM's record of it
        assert records.get(job_id) == ("COMPLETED", f"rule_{rule}"), (rule, job_id, records)
        seen.add(job_id)
    assert len(seen) == len(RULES)


NUMBER = re.compile(r"^\s*(-?\d+(?:\.(\d+))?)")


def cells_match(a: str, b: str) -> bool:
    """Table cells agree: equal text, except that a leading number may differ by one
    unit in its last printed digit (the runs' float sums may round differently)."""
    ma, mb = NUMBER.match(a), NUMBER.match(b)
    if not (ma and mb):
        return a == b
    step = 10.0 ** -len(mb.group(2)) if mb.group(2) else 0.0  # integers must match exactly
    return abs(float(ma.group(1)) - float(mb.group(1))) <= step + 1e-12 and a[ma.end():] == b[mb.end():]


@pytest.mark.slurm
def test_report_matches_the_dvc_run(slurm_run, demo_run):
    # Same code, seeds, params and thread count: only the scheduler differs.
    ours = json.loads((slurm_run / "results" / "demo" / "metrics.json").read_text())
    ref = json.loads((demo_run / "results" / "demo" / "metrics.json").read_text())
    assert set(ours) == set(ref)
    for method, values in ref.items():
        for key, b in values.items():
            a = ours[method][key]
            if isinstance(b, float):
                assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6), (method, key, a, b)
            else:
                assert a == b, (method, key, a, b)
    table = pd.read_csv(slurm_run / "reports" / "demo" / "table2.csv", dtype=str, keep_default_na=False)
    table_ref = pd.read_csv(demo_run / "reports" / "demo" / "table2.csv", dtype=str, keep_default_na=False)
    assert list(table.columns) == list(table_ref.columns) and table.shape == table_ref.shape
    for col in table_ref.columns:
        for i, (a, b) in enumerate(zip(table[col], table_ref[col])):
            assert cells_match(a, b), (col, i, a, b)


@pytest.mark.slurm
def test_dvc_commit_adopts_the_cluster_outputs(slurm_run):
    env = tool_env(slurm_run)
    proc = run(["dvc", "commit", "-f"], slurm_run, env, 600)
    assert proc.returncode == 0, tail(proc.stdout)
    assert (slurm_run / "dvc.lock").is_file()
    proc = run(["dvc", "status"], slurm_run, env, 300)
    assert proc.returncode == 0 and "up to date" in proc.stdout, tail(proc.stdout)
    proc = run(["dvc", "repro"], slurm_run, env, 600)
    assert proc.returncode == 0, tail(proc.stdout)
    assert "Running stage" not in proc.stdout, tail(proc.stdout)


@pytest.mark.slurm
def test_train_gan_spans_jobs_past_the_time_limit(slurm_run, cluster, tmp_path_factory):
    # A one-minute job limit on a train_gan cut to three epochs (300 steps, over a minute of training
    # even with subnormals flushed, so longer than the part of a job left for it): each job stops 15 s
    # ahead of its limit at a step boundary with a checkpoint, the profile's retries resubmit it, the
    # next job resumes, and the final generator equals that of the same stage run uninterrupted,
    # outside SLURM, with the same thread count.
    base = Path(tmp_path_factory.mktemp("slurm-timelimit"))
    trees = {name: base / name for name in ("uninterrupted", "slurm")}
    for tree in trees.values():
        shutil.copytree(slurm_run, tree, symlinks=True)
        edit_params(tree / "params.yaml", lambda doc: doc["demo"]["train_gan"].update(epochs=3))
    threads = tool_env()["OMP_NUM_THREADS"]
    ref = trees["uninterrupted"]
    proc = run([str(VENV_BIN / "python"), "pipeline/train_gan.py", "--profile", "demo"], ref,
               tool_env(ref, OMP_NUM_THREADS=threads), 900)
    assert proc.returncode == 0, tail(proc.stdout)
    tree = trees["slurm"]
    old_logs = set((tree / ".snakemake" / "slurm_logs" / "rule_train_gan").glob("*.log"))
    proc = run([str(VENV_BIN / "snakemake"), "--profile", "slurm", "--forcerun", "train_gan",
                "--set-threads", f"train_gan={threads}",
                "--set-resources", "train_gan:runtime=1",
                "--slurm-init-seconds-before-status-checks", "5", "--", "models/demo/train_gan/generator.pt"],
               tree, {**cluster.env(tree), "SRMAP_STOP_BEFORE_LIMIT": "15"}, SLURM_RUN_TIMEOUT_S)
    (tree / "slurm-timelimit.log").write_text(proc.stdout)
    assert proc.returncode == 0, f"snakemake failed (rc {proc.returncode}):\n{tail(proc.stdout)}"
    assert "rule pretrain:" not in proc.stdout, "only train_gan was to run"
    jobs = sorted(set((tree / ".snakemake" / "slurm_logs" / "rule_train_gan").glob("*.log")) - old_logs,
                  key=lambda p: int(p.stem))
    records = squeue_records(cluster)
    states = [records.get(p.stem, ("?", ""))[0] for p in jobs]
    assert len(jobs) >= 2 and states[-1] == "COMPLETED", (states, tail(proc.stdout))
    assert all(s in ("FAILED", "TIMEOUT") for s in states[:-1]), states
    job_logs = [p.read_text() for p in jobs]
    assert "s before the SLURM job's time limit after step" in job_logs[0], tail(job_logs[0], 3000)
    assert all("train_gan: resuming" in text for text in job_logs[1:]), tail(job_logs[-1], 3000)
    # the first run's finished 400-step checkpoint was set aside, not overwritten
    names = sorted(p.name for p in (tree / "models" / "demo" / "train_gan").glob("checkpoint*.pt"))
    assert names == ["checkpoint.pt", "checkpoint.step400.past-end.pt"], names
    import torch

    from srmap.checkpoint import load_checkpoint

    ours, reference = (load_checkpoint(t / "models" / "demo" / "train_gan" / "generator.pt")["state_dict"]
                       for t in (tree, ref))
    assert ours.keys() == reference.keys()
    differ = [k for k in reference if not torch.equal(ours[k], reference[k])]
    assert not differ, f"{len(differ)} tensors differ from the uninterrupted run, e.g. {differ[:3]}"
