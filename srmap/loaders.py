"""Loading any x4 SR model a user hands us: SRMAP's own files, or a published model through spandrel.

* :func:`load_sr_model` opens what `srmap upscale --checkpoint`, ``evaluate``
  and the ``baselines`` stage accept: SRMAP's generator files and training
  checkpoints, and any checkpoint that spandrel recognises (ESRGAN/RRDBNet in
  the original or the BasicSR key layout, BasicSR's ``params`` /
  ``params_ema`` wrappers, ``.safetensors``; also Real-ESRGAN, SwinIR, HAT
  and the other architectures of spandrel's MIT-licensed core).
* :class:`PublishedModel` gives such a model the generator's call signature
  (``model(lr, seed=, noise_scale=, origin=)``), so tiled inference and
  scoring treat both kinds alike; published models are deterministic.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from srmap.checkpoint import describe_keys, generator_from_checkpoint, is_srmap_checkpoint, load_checkpoint
from srmap.options import SCALE

if TYPE_CHECKING:
    import torch



class PublishedModel:
    """A deterministic x4 SR model loaded by spandrel, called like SRMAP's generator.

    ``model(lr, seed=None, noise_scale=0.0, origin=(0, 0))`` maps float
    (N,3,h,w) RGB in [0,1] to (N,3,4h,4w) in [0,1]; ``seed``, ``noise_scale``
    and ``origin`` are accepted and ignored (no noise). ``receptive_radius``
    is the smallest tile pad (LR pixels) for which tiled output equals the
    whole-image output, or None where it is not known for the architecture
    (attention windows, global pooling): tiles are then approximate.
    """

    deterministic = True

    def __init__(self, descriptor: Any, path: Path):
        self.descriptor = descriptor
        self.path = Path(path)
        self.architecture = descriptor.architecture.name
        self.scale = int(descriptor.scale)
        self.receptive_radius = _receptive_radius(descriptor)

    def to(self, device: "str | torch.device") -> "PublishedModel":
        """Move the weights to ``device``; returns self."""
        self.descriptor.to(device)
        return self

    def __call__(self, lr: "torch.Tensor", *, seed: int | None = None, noise_scale: float = 0.0,
                 origin: tuple[int, int] = (0, 0)) -> "torch.Tensor":
        # spandrel's call pads to the architecture's size requirements, runs under inference_mode and
        # clamps; the clone makes its inference tensor an ordinary one that callers may update in place
        return self.descriptor(lr.to(self.descriptor.dtype)).clone()

    def __repr__(self) -> str:
        return f"PublishedModel({self.architecture} x{self.scale}, {self.path.name})"


def _receptive_radius(descriptor: Any) -> int | None:
    """Receptive radius in LR pixels of the architectures where it is exact and known, else None.

    ESRGAN's RRDBNet (Wang et al. 2018, Fig. 4): one 3x3 conv, ``nb`` RRDBs of
    3 dense blocks x 5 3x3 convs, one trunk conv at LR; then two
    nearest-x2 + 3x3 conv stages and two 3x3 convs at HR, which reach
    0.5 + 0.25 + 2 x 0.25 = 1.25 LR pixels: ``15 nb + 2 + 2`` (rounded up).
    """
    if descriptor.architecture.id != "ESRGAN":
        return None
    hp = getattr(descriptor.model, "hyperparameters", {})
    if hp.get("plus") or hp.get("shuffle_factor") or hp.get("upsampler", "upconv") != "upconv" \
            or int(hp.get("scale", 0)) != SCALE:
        return None
    return 15 * int(hp["num_blocks"]) + 4


def load_sr_model(path: str | Path, device: str = "cpu"):
    """Load any x4 model a user hands us; returns an SRMAP ``Generator`` or a :class:`PublishedModel`, eval mode.

    SRMAP generator files and training checkpoints go to
    ``srmap.checkpoint.generator_from_checkpoint``; every other file to spandrel (plain
    state dicts in the original ESRGAN or BasicSR layout, ``params`` /
    ``params_ema`` wrappers, ``.safetensors``). Files are read without
    running pickled code (``torch.load(weights_only=True)``, safetensors).
    Raises FileNotFoundError for a missing file and ValueError with one short
    line naming the file for a file neither loader recognises (its key count
    and first keys), a model that is not x4 RGB super-resolution, or
    non-finite weights.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state: Mapping = load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{path}: not a readable .safetensors file ({exc})") from exc
    else:
        state = load_checkpoint(path, map_location="cpu")
        if is_srmap_checkpoint(state):
            return generator_from_checkpoint(state, path, device=device)
    descriptor = _spandrel_descriptor(state, path)
    bad = [k for k, v in descriptor.model.state_dict().items()
           if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{path}: {len(bad)} weight tensor(s) hold NaN or inf (e.g. {bad[0]}); "
                         f"the model diverged or the file is damaged")
    return PublishedModel(descriptor.eval(), path).to(device)


def _spandrel_descriptor(state: Mapping, path: Path):
    """spandrel's ImageModelDescriptor for ``state``; ValueError naming ``path`` if unusable here."""
    from spandrel import ImageModelDescriptor, ModelLoader, UnsupportedModelError

    try:
        descriptor = ModelLoader().load_from_state_dict(dict(state))
    except UnsupportedModelError:
        raise ValueError(f"{path}: neither an SRMAP checkpoint nor a model spandrel recognises "
                         f"({describe_keys(state)})") from None
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ValueError(f"{path}: spandrel recognised its layout but its weights do not load ({first})") from None
    name = descriptor.architecture.name
    if not isinstance(descriptor, ImageModelDescriptor) or descriptor.purpose != "SR":
        raise ValueError(f"{path}: a {name} model for {descriptor.purpose}, not super-resolution")
    if descriptor.scale != SCALE or descriptor.input_channels != 3 or descriptor.output_channels != 3:
        raise ValueError(f"{path}: a {name} model for x{descriptor.scale}, {descriptor.input_channels}->"
                         f"{descriptor.output_channels} channels; expected x{SCALE} RGB->RGB")
    return descriptor
