"""Checkpoints: weights (+ EMA), every config field, the preprocessing, the noise convention, a format version.

The model and the diffusion are always rebuilt from the stored config (``build``), so detection runs exactly the
network that was trained. Files are written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Optional

import torch

from . import __version__
from .config import SACDiffConfig, from_dict, to_dict
from .diffusion import Diffusion
from .atomic import replaced_file
from .errors import SACDiffError
from .progress import log
from .unet import UNet

FORMAT = "sacdiff-checkpoint"
FORMAT_VERSION = 1


def build(cfg: SACDiffConfig, noise_seed: int = 0) -> tuple[UNet, Diffusion]:
    """The one place where model and diffusion are constructed from a config."""
    return UNet(cfg.model), Diffusion(cfg.diffusion, noise_seed=noise_seed)


def save_checkpoint(
    path,
    cfg: SACDiffConfig,
    model: torch.nn.Module,
    ema: Optional[torch.nn.Module] = None,
    train_state: Optional[dict] = None,
    extra: Optional[dict] = None,
) -> Path:
    path = Path(path)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "sacdiff_version": __version__,
        "torch_version": str(torch.__version__),
        "python": platform.python_version(),
        "config": to_dict(cfg),
        # Duplicated for people and tools that only want the preprocessing / noise convention.
        "preprocessing": to_dict(cfg.preprocess),
        "noise": to_dict(cfg.diffusion.noise),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "ema": None if ema is None else {k: v.detach().cpu() for k, v in ema.state_dict().items()},
        "train_state": train_state,
        "extra": extra or {},
    }
    return _save_atomically(payload, path)


def _save_atomically(payload: dict, path) -> Path:
    """torch.save to a temporary name beside ``path``, renamed into place when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_file(path) as tmp:
        torch.save(payload, tmp)
    return path


def read_checkpoint(path) -> dict:
    """The raw checkpoint dict, after checking that it is a readable SACDiff checkpoint of this format."""
    path = Path(path)
    if path.is_dir():
        raise SACDiffError(f"model {path} is a folder; pass --model with the checkpoint file (.pt) inside it")
    if not path.is_file():
        raise SACDiffError(f"model file {path} does not exist; pass --model with a checkpoint from `sacdiff train`")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt, or not a torch file at all
        raise SACDiffError(
            f"model file {path} is corrupt or not a SACDiff checkpoint ({type(exc).__name__}); "
            "re-download or retrain it"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise SACDiffError(f"{path} is a torch file but not a SACDiff checkpoint; pass a file from `sacdiff train`")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise SACDiffError(
            f"{path} has checkpoint format {version}, this SACDiff reads format {FORMAT_VERSION}; "
            f"use SACDiff {payload.get('sacdiff_version', '?')} or retrain"
        )
    return payload


def load_checkpoint(path, device="cpu", use_ema: bool = True, noise_seed: int = 0):
    """(config, model in eval mode on ``device``, diffusion, raw payload). EMA weights when present."""
    payload = read_checkpoint(path)
    cfg = from_dict(payload["config"])
    model, diffusion = build(cfg, noise_seed=noise_seed)
    weights = payload["ema"] if (use_ema and payload.get("ema")) else payload["model"]
    broken = [k for k, v in weights.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise SACDiffError(f"weights in {path} hold NaN/infinite values ({', '.join(broken[:3])}"
                           f"{'…' if len(broken) > 3 else ''}): the training diverged or the file is damaged — "
                           "retrain (lower --lr) or use another checkpoint")
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise SACDiffError(
            f"weights in {path} do not fit the network its config describes ({first}); the file is damaged "
            "or was edited — retrain"
        ) from None
    model.to(device).eval()
    return cfg, model, diffusion.to(device), payload


def load_for_detection(path=None, device="cpu", seed: int = 0, noise_kind: Optional[str] = None,
                       **detect) -> tuple[SACDiffConfig, UNet, Diffusion]:
    """A checkpoint (default: the shipped model) ready to detect with: its config with the command's detection
    options applied (``derive``: every option range-checked before any scan is read), the network and the
    diffusion. ``noise_kind`` replaces the trained noise family (an ablation; noted through ``progress.log``)."""
    from .config import derive

    path = shipped_model_path() if path is None else path
    cfg, model, diffusion, _ = load_checkpoint(path, device, noise_seed=seed)
    cfg = derive(cfg, detect=dict(detect, seed=seed))
    if noise_kind and noise_kind != cfg.diffusion.noise.kind:
        log.info(f"note: the model was trained with {cfg.diffusion.noise.kind} noise; detecting with {noise_kind}")
        cfg = derive(cfg, diffusion={"noise": {"kind": noise_kind}})
        _, diffusion = build(cfg, noise_seed=seed)
        diffusion.to(device)
    return cfg, model, diffusion


def slim_checkpoint(src, dst, half: bool = True, detect: Optional[dict] = None, note: Optional[dict] = None) -> Path:
    """A checkpoint for shipping: the EMA weights (or the raw ones) as the model, optionally in float16, with the
    config and provenance but without optimizer state. Loads through ``load_checkpoint`` like any other (the
    weights are cast back to float32 on load). ``detect`` sets the model's default detection settings (e.g. the
    ones ``sacdiff validate`` chose), checked like any config; ``note`` is added to the provenance."""
    payload = read_checkpoint(src)
    if detect:
        from .config import derive

        payload = dict(payload, config=to_dict(derive(from_dict(payload["config"]), detect=detect)))
    weights = payload["ema"] or payload["model"]
    if half:
        weights = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
    extra = dict(payload.get("extra") or {})
    extra.update({"slimmed_from": Path(src).name, "weights": "ema" if payload["ema"] else "model",
                  "stored_dtype": "float16" if half else "float32", **(note or {})})
    slim = dict(payload, model=weights, ema=None, train_state=None, extra=extra)
    return _save_atomically(slim, dst)


# The default: 2.5D (round 10 of Resources/results/map-candidates.md); the 2D sacdiff-small256.pt ships beside it
SHIPPED_MODEL = "sacdiff-small256-context.pt"


def shipped_model_path() -> Path:
    """The reference model shipped with SACDiff (``Resources/models`` of the source tree / extension, or
    ``SACDiffLib/models`` where the library is installed alone). Raises with a clear fix when it is absent."""
    path, looked = find_shipped(SHIPPED_MODEL)
    if path is None:
        raise SACDiffError(f"no model was named and the shipped model {SHIPPED_MODEL} is not installed (looked in "
                           f"{looked}); pass --model CKPT or train one with `sacdiff train`")
    return path


def find_shipped(name: str) -> tuple[Optional[Path], str]:
    """(a file shipped with SACDiff — ``Resources/models`` of the source tree / extension, or ``SACDiffLib/models``
    where the library is installed alone — or None, the folders looked in)."""
    here = Path(__file__).resolve().parent
    candidates = [here.parent / "Resources" / "models" / name, here / "models" / name]
    found = next((path for path in candidates if path.is_file()), None)
    return found, ", ".join(str(c.parent) for c in candidates)
