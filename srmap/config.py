"""Read and validate ``params.yaml``: the active profile, its sections, and the stage paths.

Every problem is raised as :class:`ConfigError` with one line that names the
file and the dotted key, so a stage fails with a message like
``params.yaml: missing key 'demo.pretrain.lr' (a number)``. The schema of the
``model.generator``, ``model.critic``, ``pretrain`` and ``train_gan`` sections is
derived from the records in :mod:`srmap.options`, which also check each value's
range.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import signal
import sys
import time
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from srmap.options import CONSISTENCY, SCALE, CriticConfig, GanOptions, GeneratorConfig, OptionError, PretrainOptions

NUM = (int, float)
OPT_NUM = (int, float, type(None))  # a number or null
OPT_INT = (int, type(None))  # an integer or null
# The pipeline's stages, in order; dvc.yaml and the Snakefile define exactly these (tests/test_workflow.py).
STAGES = ("download", "degrade", "pretrain", "train_gan", "baselines", "evaluate", "report")
RESOURCES = {"gpus": int, "cpus": int, "mem_mb": int, "runtime": int}  # one stage's cluster request
# Sections whose keys are the fields of a record (srmap.options); their schema derives from it.
OPTIONS = {"model.generator": GeneratorConfig, "model.critic": CriticConfig, "pretrain": PretrainOptions,
           "train_gan": GanOptions}


def _yaml_type(hint: Any) -> Any:
    """The params.yaml type of an options field's annotation (int, NUM, OPT_NUM, bool, str or list)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in (int, bool, str):
        return hint
    if hint is float:
        return NUM
    if origin is typing.Literal and all(isinstance(a, str) for a in args):
        return str
    if origin is tuple:
        return list
    if origin in (typing.Union, types.UnionType) and set(args) == {float, type(None)}:
        return OPT_NUM
    raise TypeError(f"no params.yaml type for the annotation {hint!r}")


def options_schema(cls: type) -> dict[str, Any]:
    """``{field name: params.yaml type}`` of an options dataclass, in field order.

    Raises TypeError for an annotation with no params.yaml counterpart (add it to :func:`_yaml_type`).
    """
    hints = typing.get_type_hints(cls)
    return {f.name: _yaml_type(hints[f.name]) for f in dataclasses.fields(cls)}


# Expected keys (and types) of each profile section. Nested dicts are sub-schemas.
SCHEMA: dict[str, Any] = {
    "data": {"source": str, "train": list, "valid": list, "scale": int, "max_pixels": int, "workers": int},
    "model": {"generator": options_schema(GeneratorConfig), "critic": options_schema(CriticConfig)},
    "pretrain": options_schema(PretrainOptions),
    "train_gan": options_schema(GanOptions),
    "evaluate": {"samples": int, "noise_scale": NUM, "crop_border": int, "lpips_pretrained": bool, "tile": int,
                 "tile_pad": int, "consistency": list},
    "baselines": {"models": list, "checkpoints": dict, "external": dict, "download": bool, "tile": int,
                  "tile_pad": OPT_INT},
    "report": {"crop_size": int, "seed": int},
    # Read by the Snakefile only; no dvc.yaml stage tracks it (degrade's CPUs follow data.workers).
    "resources": {stage: RESOURCES for stage in STAGES if stage != "degrade"},
}
# Allowed values. Only x4: the generator, training, evaluation and report are built for 4.
# (The options records check their own ranges and choices, e.g. train_gan.adv_loss.)
CHOICES = {"data.source": ("skimage", "div2k"), "data.scale": (SCALE,)}
# Lists whose items come from a fixed set (non-empty, no repeats): evaluate.consistency gives Table 2 a row of
# each model per item ("project": its outputs projected onto the consistent images, srmap.resize).
LIST_CHOICES = {"evaluate.consistency": CONSISTENCY}


class ConfigError(ValueError):
    """A problem in params.yaml, with a one-line message naming the key."""


def _type_name(t: Any) -> str:
    if isinstance(t, dict):
        return "a mapping"
    if t is NUM:
        return "a number"
    if t is OPT_NUM:
        return "a number or null"
    if t is OPT_INT:
        return "an integer or null"
    return {int: "an integer", bool: "true/false", str: "a string", list: "a list", dict: "a mapping"}[t]


def _check(node: Any, schema: Mapping[str, Any], where: str, fname: str) -> None:
    if not isinstance(node, Mapping):
        raise ConfigError(f"{fname}: key '{where}' must be a mapping, got {type(node).__name__}")
    for key, t in schema.items():
        dotted = f"{where}.{key}"
        if key not in node:
            raise ConfigError(f"{fname}: missing key '{dotted}' ({_type_name(t)})")
        value = node[key]
        if isinstance(t, dict):
            _check(value, t, dotted, fname)
            continue
        # bool is an int subclass: keep true/false out of numeric keys and vice versa
        ok = isinstance(value, t) and not (t is not bool and isinstance(value, bool))
        if t is NUM or t is OPT_NUM or t is OPT_INT:
            ok = isinstance(value, t) and not isinstance(value, bool)
        if not ok:
            raise ConfigError(f"{fname}: key '{dotted}' must be {_type_name(t)}, got {value!r}")
    for key in node:
        if key not in schema:
            raise ConfigError(f"{fname}: unknown key '{where}.{key}' (expected one of: {', '.join(schema)})")


# Numbers YAML 1.2 reads as floats and PyYAML's YAML 1.1 reads as strings: an exponent without a dot or sign
# ("1e-4", "2E5"). DVC reads params.yaml as YAML 1.2, so these are numbers to it.
_YAML12_FLOAT = re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$")


def yaml12_numbers(obj: Any) -> Any:
    """A copy of a loaded YAML document with "1e-4"-style strings as floats, as YAML 1.2 (and DVC) reads them.

    PyYAML (and so Snakemake's ``configfile``) follows YAML 1.1, where a float
    needs a dot and a signed exponent; SRMAP accepts what users write. Lists
    and mappings are copied; nothing else changes.
    """
    if isinstance(obj, dict):
        return {k: yaml12_numbers(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [yaml12_numbers(v) for v in obj]
    if isinstance(obj, str) and _YAML12_FLOAT.match(obj):
        return float(obj)
    return obj


def read_yaml(path: str | Path) -> Any:
    """The YAML document in ``path``, numbers as :func:`yaml12_numbers` reads them.

    Raises ConfigError naming the file, line and column of a syntax error, or a missing file.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found (expected the pipeline's params.yaml)")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path.name}: not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    return yaml12_numbers(doc)


def load_params(path: str | Path, profile: str | None = None) -> tuple[str, dict]:
    """Load ``path`` (:func:`read_yaml`) and return ``(profile_name, profile_section)`` after validating it.

    ``profile`` overrides the file's top-level ``profile`` key. Raises ConfigError.
    """
    return validate(read_yaml(path), profile, Path(path).name)


def validate(doc: Any, profile: str | None = None, fname: str = "params.yaml") -> tuple[str, dict]:
    """Validate a loaded params document; return ``(profile_name, profile_section)``.

    ``profile`` overrides the document's ``profile`` key. Raises ConfigError.
    """
    if not isinstance(doc, dict):
        raise ConfigError(f"{fname}: expected a mapping at the top level, got {type(doc).__name__}")
    if "profile" not in doc:
        raise ConfigError(f"{fname}: missing key 'profile' (the active profile's name)")
    name = profile or doc["profile"]
    profiles = [k for k, v in doc.items() if k != "profile" and isinstance(v, dict)]
    if not isinstance(name, str) or name not in profiles:
        raise ConfigError(f"{fname}: unknown profile {name!r} (expected one of: {', '.join(profiles)})")
    section = doc[name]
    _check(section, SCHEMA, name, fname)
    for dotted, allowed in CHOICES.items():
        sec, key = dotted.split(".")
        if section[sec][key] not in allowed:
            expected = f"{allowed[0]!r}" if len(allowed) == 1 else f"one of {allowed}"
            raise ConfigError(f"{fname}: key '{name}.{dotted}' must be {expected}, got {section[sec][key]!r}")
    for dotted, allowed in LIST_CHOICES.items():
        sec, key = dotted.split(".")
        items = section[sec][key]
        if not items or len(set(map(str, items))) != len(items) or any(i not in allowed for i in items):
            raise ConfigError(f"{fname}: key '{name}.{dotted}' must be a non-empty list of distinct values from "
                              f"{list(allowed)}, got {items!r}")
    for dotted, cls in OPTIONS.items():
        node = section
        for part in dotted.split("."):
            node = node[part]
        try:
            cls(**node)
        except OptionError as exc:
            raise ConfigError(f"{fname}: key '{name}.{dotted}.{exc.key}' must be {exc.expected}, "
                              f"got {exc.value!r}") from None
    return name, section


@dataclass(frozen=True)
class Paths:
    """Every stage input/output of one profile, absolute. dvc.yaml and the Snakefile spell the same paths."""

    root: Path
    profile: str

    def _p(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    @property
    def hr(self) -> Path:  # download -> HR PNGs, hr/train and hr/valid
        return self._p("data", self.profile, "hr")

    @property
    def prepared(self) -> Path:  # degrade -> train/{hr,lr}/*.npy, valid/{hr,lr}/*.png
        return self._p("data", self.profile, "prepared")

    @property
    def pretrain(self) -> Path:
        return self._p("models", self.profile, "pretrain")

    @property
    def train_gan(self) -> Path:
        return self._p("models", self.profile, "train_gan")

    @property
    def results(self) -> Path:  # evaluate -> eval/ (SR images, per-image CSVs) and metrics.json
        return self._p("results", self.profile)

    @property
    def baselines(self) -> Path:  # baselines -> eval/ (SR images, per-image CSVs) and metrics.json
        return self._p("results", self.profile, "baselines")

    @property
    def report(self) -> Path:
        return self._p("reports", self.profile)


@dataclass(frozen=True)
class StageContext:
    """What a stage script needs: the root, the profile name, its validated params, its paths."""

    root: Path
    profile: str
    params: dict
    paths: Paths


def peak_memory() -> str:
    """This process's peak memory so far, for a stage's last line: the peak resident set (GiB) of the
    process and of its largest finished child process (DataLoader or pool workers), and the CUDA
    allocator's peak (GiB) when CUDA was used. Source: getrusage(2) ``ru_maxrss`` (KiB on Linux)."""
    import resource

    gib = 1024 ** 2  # KiB per GiB
    parts = [f"peak memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / gib:.2f} GiB"]
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if children:
        parts.append(f"largest worker {children / gib:.2f} GiB")
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        parts.append(f"CUDA peak allocated {torch.cuda.max_memory_allocated() / 1024 ** 3:.2f} GiB")
    return ", ".join(parts)


def stage_main(stage: str, body: Callable[[StageContext], None], argv: list[str] | None = None) -> None:
    """Run a pipeline stage script: parse ``--profile``/``--params``, validate, call ``body``.

    Any ConfigError, ValueError, FileNotFoundError, OSError (a full disk
    included) or RuntimeError becomes one ``srmap <stage>: error: ...`` line on
    stderr and exit status 2 (set SRMAP_DEBUG=1 for the traceback). SIGTERM and
    SIGUSR1 outside the training loops (which handle them themselves) and
    Ctrl-C end the stage with one line and exit status 128 + the signal (143,
    138, 130), so MLflow marks its run KILLED; a training stage stopped ahead of
    its SLURM job's time limit exits 75. A stage that succeeds ends with one
    line ``srmap <stage>: done in <s> s; peak memory ...`` (:func:`peak_memory`).
    """
    from srmap.utils import Interrupted, project_root, signals_raise_interrupted

    root = project_root()
    ap = argparse.ArgumentParser(prog=f"pipeline/{stage}.py", description=f"SRMAP pipeline stage '{stage}'.")
    ap.add_argument("--profile", help="profile in params.yaml (default: its 'profile' key)")
    ap.add_argument("--params", type=Path, default=root / "params.yaml", help="parameters file")
    args = ap.parse_args(argv)
    try:
        with signals_raise_interrupted([signal.SIGTERM, signal.SIGUSR1]):
            profile, params = load_params(args.params, args.profile)
            started = time.monotonic()
            body(StageContext(root=root, profile=profile, params=params, paths=Paths(root, profile)))
        print(f"srmap {stage}: done in {time.monotonic() - started:.1f} s; {peak_memory()}", file=sys.stderr)
    except Interrupted as exc:
        message = str(exc).removeprefix(f"{stage}: ")  # training's messages name their stage already
        print(f"srmap {stage}: {message}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
    except KeyboardInterrupt:
        print(f"srmap {stage}: interrupted (Ctrl-C)", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    except (ConfigError, ValueError, OSError, RuntimeError) as exc:
        if os.environ.get("SRMAP_DEBUG"):
            raise
        print(f"srmap {stage}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
