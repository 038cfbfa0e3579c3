# SRMAP pipeline for Snakemake: the same seven stages, scripts and paths as dvc.yaml
# (tests/test_workflow.py fails if they drift apart).
#   snakemake                    # one machine (profiles/default)
#   snakemake --profile slurm    # a SLURM cluster (profiles/slurm; partition/account are set there)
#   snakemake --config profile=paper
# Per-stage resources (GPUs, CPUs, memory, runtime) come from params.yaml's
# <profile>.resources.<stage>, which DVC does not track. Each rule tracks the same
# params as its dvc.yaml stage (read from dvc.yaml), so both engines re-run on the same edits.

import sys

import yaml

# The same reading and validation as the stage scripts: one line naming the file, line or key, then exit.
# params.yaml is read here first so that a syntax error names its line and column, not this file's.
sys.path.insert(0, workflow.basedir)
from srmap.config import ConfigError, read_yaml, validate, yaml12_numbers

try:
    read_yaml(f"{workflow.basedir}/params.yaml")
except ConfigError as exc:
    sys.exit(f"snakemake: error: {exc}")

configfile: "params.yaml"

# YAML 1.2 numbers ("1e-4"), as DVC reads them, so that both engines see the same values.
CONFIG = yaml12_numbers(config)
try:
    PROFILE, P = validate(CONFIG)
except ConfigError as exc:
    sys.exit(f"snakemake: error: {exc}")


with open(f"{workflow.basedir}/dvc.yaml") as f:
    DVC_STAGES = yaml.safe_load(f)["stages"]


def tracked(stage):
    """{key: value} of the params dvc.yaml's `stage` tracks, keyed as dvc.lock records them ("demo.data.scale")."""
    values = {}
    for key in DVC_STAGES[stage]["params"]:
        key = key.replace("${profile}", PROFILE)
        node = CONFIG
        for part in key.split("."):
            node = node[part]
        values[key] = node
    return values


def res(stage, key):
    return int(P["resources"][stage][key])


def launcher(stage):
    """torchrun for multi-GPU training, plain python otherwise."""
    gpus = res(stage, "gpus")
    return f"torchrun --standalone --nproc_per_node={gpus}" if gpus > 1 else "python"


def resources(stage):
    r = dict(cpus_per_task=res(stage, "cpus"), mem_mb=res(stage, "mem_mb"), runtime=res(stage, "runtime"))
    if res(stage, "gpus") > 0:
        r["gpu"] = res(stage, "gpus")
    return r


# Software for `--sdm conda` (every rule); by default jobs use the current environment (make setup's .venv).
CONDA_ENV = "envs/srmap.yaml"

# Each job records where it ran, so a cluster run can be audited per rule.
RUN = 'echo "host=$(hostname) SLURM_JOB_ID=${{SLURM_JOB_ID:-none}}" > {log}; '


rule all:
    input:
        f"reports/{PROFILE}",


rule download:
    input:
        "pipeline/download.py",
        "srmap/config.py",
        "srmap/data.py",
        "srmap/download.py",
        "srmap/imageio.py",
        "srmap/options.py",
        "srmap/prepare.py",
        "srmap/resize.py",
        "srmap/utils.py",
        "srmap/venv.py",
        "srmap/div2k.json",
    output:
        directory(f"data/{PROFILE}/hr"),
    params:
        tracked=tracked("download"),
    log:
        f"logs/{PROFILE}/download.log",
    resources:
        **resources("download"),
    conda:
        CONDA_ENV
    shell:
        f"{RUN}python pipeline/download.py --profile {PROFILE} 2>&1 | tee -a {{log}}"


rule degrade:
    input:
        "pipeline/degrade.py",
        "srmap/config.py",
        "srmap/data.py",
        "srmap/imageio.py",
        "srmap/options.py",
        "srmap/prepare.py",
        "srmap/resize.py",
        "srmap/utils.py",
        "srmap/venv.py",
        f"data/{PROFILE}/hr",
    output:
        directory(f"data/{PROFILE}/prepared"),
    params:
        tracked=tracked("degrade"),
    log:
        f"logs/{PROFILE}/degrade.log",
    threads: int(P["data"]["workers"])
    resources:
        # each worker holds one decoded HR image (a DIV2K image is ~8 MB) plus its resize buffers
        cpus_per_task=int(P["data"]["workers"]), mem_mb=2000 * max(1, int(P["data"]["workers"])), runtime=120,
    conda:
        CONDA_ENV
    shell:
        f"{RUN}python pipeline/degrade.py --profile {PROFILE} 2>&1 | tee -a {{log}}"


rule pretrain:
    input:
        "pipeline/pretrain.py",
        "srmap/checkpoint.py",
        "srmap/config.py",
        "srmap/data.py",
        "srmap/losses.py",
        "srmap/nets.py",
        "srmap/noise.py",
        "srmap/options.py",
        "srmap/resize.py",
        "srmap/resume.py",
        "srmap/tracking.py",
        "srmap/train.py",
        "srmap/train_utils.py",
        "srmap/utils.py",
        "srmap/venv.py",
        f"data/{PROFILE}/prepared",
    output:
        f"models/{PROFILE}/pretrain/generator.pt",
        f"models/{PROFILE}/pretrain/training_options.json",
        f"models/{PROFILE}/pretrain/losses.csv",
    params:
        tracked=tracked("pretrain"),
        launcher=launcher("pretrain"),
    log:
        f"logs/{PROFILE}/pretrain.log",
    threads: res("pretrain", "cpus")
    resources:
        **resources("pretrain"),
    conda:
        CONDA_ENV
    shell:
        f"{RUN}{{params.launcher}} pipeline/pretrain.py --profile {PROFILE} 2>&1 | tee -a {{log}}"


rule train_gan:
    input:
        "pipeline/train_gan.py",
        "srmap/checkpoint.py",
        "srmap/config.py",
        "srmap/data.py",
        "srmap/losses.py",
        "srmap/nets.py",
        "srmap/noise.py",
        "srmap/options.py",
        "srmap/resize.py",
        "srmap/resume.py",
        "srmap/tracking.py",
        "srmap/train.py",
        "srmap/train_utils.py",
        "srmap/utils.py",
        "srmap/venv.py",
        f"data/{PROFILE}/prepared",
        f"models/{PROFILE}/pretrain/generator.pt",
    output:
        f"models/{PROFILE}/train_gan/generator.pt",
        f"models/{PROFILE}/train_gan/training_options.json",
        directory(f"models/{PROFILE}/train_gan/monitor"),
        f"models/{PROFILE}/train_gan/losses.csv",
    params:
        tracked=tracked("train_gan"),
        launcher=launcher("train_gan"),
    log:
        f"logs/{PROFILE}/train_gan.log",
    threads: res("train_gan", "cpus")
    resources:
        **resources("train_gan"),
    conda:
        CONDA_ENV
    shell:
        f"{RUN}{{params.launcher}} pipeline/train_gan.py --profile {PROFILE} 2>&1 | tee -a {{log}}"


rule baselines:
    input:
        "pipeline/baselines.py",
        "srmap/baselines.py",
        "srmap/checkpoint.py",
        "srmap/config.py",
        "srmap/download.py",
        "srmap/evaluate.py",
        "srmap/imageio.py",
        "srmap/inference.py",
        "srmap/loaders.py",
        "srmap/metrics.py",
        "srmap/nets.py",
        "srmap/noise.py",
        "srmap/options.py",
        "srmap/resize.py",
        "srmap/tracking.py",
        "srmap/utils.py",
        "srmap/venv.py",
        "srmap/baselines.json",
        f"data/{PROFILE}/prepared",
    output:
        directory(f"results/{PROFILE}/baselines/eval"),
        f"results/{PROFILE}/baselines/metrics.json",
    params:
        tracked=tracked("baselines"),
    log:
        f"logs/{PROFILE}/baselines.log",
    threads: res("baselines", "cpus")
    resources:
        **resources("baselines"),
    conda:
        CONDA_ENV
    shell:
        f"{RUN}python pipeline/baselines.py --profile {PROFILE} 2>&1 | tee -a {{log}}"


rule evaluate:
    input:
        "pipeline/evaluate.py",
        "srmap/checkpoint.py",
        "srmap/config.py",
        "srmap/evaluate.py",
        "srmap/imageio.py",
        "srmap/inference.py",
        "srmap/loaders.py",
        "srmap/metrics.py",
        "srmap/nets.py",
        "srmap/noise.py",
        "srmap/options.py",
        "srmap/resize.py",
        "srmap/tracking.py",
        "srmap/utils.py",
        "srmap/venv.py",
        f"data/{PROFILE}/prepared",
        f"models/{PROFILE}/pretrain/generator.pt",
        f"models/{PROFILE}/train_gan/generator.pt",
    output:
        directory(f"results/{PROFILE}/eval"),
        f"results/{PROFILE}/metrics.json",
    params:
        tracked=tracked("evaluate"),
    log:
        f"logs/{PROFILE}/evaluate.log",
    threads: res("evaluate", "cpus")
    resources:
        **resources("evaluate"),
    conda:
        CONDA_ENV
    shell:
        f"{RUN}python pipeline/evaluate.py --profile {PROFILE} 2>&1 | tee -a {{log}}"


rule report:
    input:
        "pipeline/report.py",
        "srmap/config.py",
        "srmap/explorer.py",
        "srmap/imageio.py",
        "srmap/options.py",
        "srmap/report.py",
        "srmap/utils.py",
        "srmap/venv.py",
        "srmap/published.csv",
        f"results/{PROFILE}/metrics.json",
        f"results/{PROFILE}/eval",
        f"results/{PROFILE}/baselines/metrics.json",
        f"results/{PROFILE}/baselines/eval",
        f"data/{PROFILE}/prepared",
        f"models/{PROFILE}/pretrain/losses.csv",
        f"models/{PROFILE}/train_gan/losses.csv",
    output:
        directory(f"reports/{PROFILE}"),
    params:
        tracked=tracked("report"),
    log:
        f"logs/{PROFILE}/report.log",
    resources:
        **resources("report"),
    conda:
        CONDA_ENV
    shell:
        f"{RUN}python pipeline/report.py --profile {PROFILE} 2>&1 | tee -a {{log}}"
