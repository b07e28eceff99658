"""Detection (Algorithm 2, Sections 2.4–2.5, 3.2): ensemble reconstruction and the volume driver.

``reconstruct_ensemble`` is pure tensors in, tensors out: K members of the partial chain T_s → 0, batched as
members × slices. Every slice of a volume sees the same noise field per member and step (Section 3.2: a fixed seed
gives one noise pattern per volume, which keeps neighbouring slices consistent); members get different fields.
Slices are processed in chunks (``batch_size``) and each chunk re-seeds the generator, so the result does not
depend on the chunk size.

``detect_volume`` reads the CT geometry, selects lung slices, moves them to the model grid, runs the ensemble, maps
error / uncertainty / pseudo-healthy back to the CT grid and binarises the error (``postprocess``).
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import SimpleITK as sitk
import torch

from . import io
from .config import DetectConfig, SACDiffConfig, validate
from .diffusion import Diffusion
from .errors import SACDiffError
from .lung import lung_labels, segment_lungs
from .postprocess import Threshold, background_threshold, binarise, fixed_threshold, quantify

# progress(fraction in [0, 1], message) -> False to cancel
Progress = Callable[[float, str], Optional[bool]]


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SACDiffError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise SACDiffError(f"device {device!r} unknown; choose auto, cpu or cuda")
    return torch.device(device)


@torch.inference_mode()
def reconstruct_ensemble(
    model: torch.nn.Module,
    diffusion: Diffusion,
    x: torch.Tensor,
    cond: Optional[torch.Tensor],
    steps: int,
    ensemble: int,
    seed: int,
    batch_size: int = 0,
    progress: Optional[Progress] = None,
) -> torch.Tensor:
    """K pseudo-healthy reconstructions of every slice: x (S, 1, H, W) in [−1, 1] → (K, S, 1, H, W)."""
    s, _, h, w = x.shape
    k = ensemble
    chunk = s if batch_size <= 0 else max(1, min(batch_size, s))
    device = x.device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    out = torch.empty((k, s, 1, h, w), dtype=torch.float32, device=device)
    n_chunks = (s + chunk - 1) // chunk
    for ci, start in enumerate(range(0, s, chunk)):
        stop = min(start + chunk, s)
        n = stop - start
        generator = torch.Generator(device=device).manual_seed(seed)

        def noise(_t: int) -> torch.Tensor:  # (K, 1, H, W) → the same field for every slice of member k
            z = diffusion.sample_noise(k, h, w, generator, device=device)
            return z.unsqueeze(1).expand(k, n, 1, h, w).reshape(k * n, 1, h, w)

        xb = x[start:stop].unsqueeze(0).expand(k, n, 1, h, w).reshape(k * n, 1, h, w)
        cb = None if cond is None else cond[start:stop].unsqueeze(0).expand(k, n, 1, h, w).reshape(k * n, 1, h, w)

        def eps_model(x_t, c, t):
            with autocast:
                return model(x_t, c, t).float()

        def on_step(t: int, ci=ci):
            if progress is None:
                return True
            done = ci * steps + (steps - t + 1)
            return progress(done / (n_chunks * steps), f"reverse step {steps - t + 1}/{steps}, chunk {ci + 1}/{n_chunks}")

        recon = diffusion.partial_chain(eps_model, xb, cb, steps, noise, on_step)
        out[:, start:stop] = recon.view(k, n, 1, h, w)
    return out


def error_maps(x: torch.Tensor, members: torch.Tensor, kind: str = "mean-of-errors"):
    """(E, uncertainty, pseudo-healthy) from the query x (S,1,H,W) and members (K,S,1,H,W).

    mean-of-errors: E = (1/K) Σ_k (x − x̂₀ᵏ)²  (the issue's reading; = (x − x̄₀)² + σ², so it also counts the
    members' disagreement). error-of-mean: E = (x − x̄₀)² (Section 2.5's "averaged ... stable estimate").
    Uncertainty σ = population std over members (Section 2.5); pseudo-healthy x̄₀ = member mean.
    """
    mean = members.mean(0)
    std = members.std(0, unbiased=False) if members.shape[0] > 1 else torch.zeros_like(mean)
    if kind == "mean-of-errors":
        err = (x.unsqueeze(0) - members).pow(2).mean(0)
    else:
        err = (x - mean).pow(2)
    return err, std, mean


@dataclass
class DetectionResult:
    reference: sitk.Image  # the CT (geometry of every output)
    ct_hu: np.ndarray
    lung: np.ndarray  # uint8 labels 1 right / 2 left
    processed: np.ndarray  # z indices of the slices run through the model
    error: np.ndarray  # E on the CT grid (windowed units², 0 on unprocessed slices)
    uncertainty_hu: np.ndarray
    pseudo_healthy_hu: np.ndarray
    mask: np.ndarray  # uint8
    threshold: Threshold
    detect: DetectConfig
    report: dict = field(default_factory=dict)


def prepare_lung(ct: sitk.Image, hu: np.ndarray, lung_path=None) -> tuple[np.ndarray, str]:
    if lung_path is None:
        return segment_lungs(hu, ct), "automatic (sacdiff lungmask fallback)"
    return lung_labels(io.read_mask(lung_path, ct), ct), str(lung_path)


def detect_volume(
    ct_path,
    model: torch.nn.Module,
    diffusion: Diffusion,
    cfg: SACDiffConfig,
    lung_path=None,
    device: torch.device = torch.device("cpu"),
    progress: Optional[Progress] = None,
) -> DetectionResult:
    """Run SAC-Diff on one CT file / DICOM folder with the settings in ``cfg.detect``."""
    validate(cfg)
    det, pre = cfg.detect, cfg.preprocess
    timings = {}
    t0 = time.perf_counter()
    ct = io.read_ct(ct_path)
    hu = io.ct_array(ct)
    lung, lung_source = prepare_lung(ct, hu, lung_path)
    processed = io.lung_slices(lung, pre.min_lung_fraction)
    if processed.size == 0:
        raise SACDiffError(
            f"no slice has ≥ {pre.min_lung_fraction:.1%} lung in the lung mask; check that the mask belongs to "
            "this CT and covers the lungs"
        )
    timings["read_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    x = io.to_model_grid(torch.from_numpy(io.window(hu[processed], pre)), pre.image_size, pad_value=-1.0).to(device)
    c = io.to_model_grid(torch.from_numpy(lung[processed] > 0), pre.image_size, 0.0, mask=True).to(device)
    cond = c if cfg.model.conditional else None
    members = reconstruct_ensemble(
        model, diffusion, x, cond, det.steps, det.ensemble, det.seed, det.batch_size, progress
    )
    err, std, mean = error_maps(x, members, det.error)
    shape = hu.shape[1:]
    err_ct = io.from_model_grid(err, shape).cpu().numpy()
    std_ct = io.from_model_grid(std, shape).cpu().numpy()
    mean_ct = io.from_model_grid(mean, shape).cpu().numpy()
    timings["diffusion_s"] = time.perf_counter() - t1

    error = np.zeros(hu.shape, np.float32)
    error[processed] = np.maximum(err_ct, 0)
    uncertainty = np.zeros(hu.shape, np.float32)
    uncertainty[processed] = std_ct * io.hu_per_unit(pre)
    pseudo = hu.copy()
    pseudo[processed] = io.unwindow(mean_ct.clip(-1, 1), pre)
    result = DetectionResult(ct, hu, lung, processed, error, uncertainty, pseudo, None, None, det)
    t2 = time.perf_counter()
    rethreshold(result, det.lam)
    timings["postprocess_s"] = time.perf_counter() - t2
    timings["total_s"] = time.perf_counter() - t0
    result.report.update(
        {
            "ct": str(ct_path),
            "lung_mask": lung_source,
            "device": str(device),
            "timings": {k: round(v, 3) for k, v in timings.items()},
            "network_evaluations": int(det.steps * det.ensemble * processed.size),
            "config": dataclasses.asdict(cfg),
        }
    )
    return result


def rethreshold(result: DetectionResult, lam: float, crf: Optional[bool] = None) -> DetectionResult:
    """Binarise the cached error map again with λ (no diffusion). Updates mask, threshold and report."""
    det = dataclasses.replace(result.detect, lam=float(lam), crf=result.detect.crf if crf is None else crf)
    if det.threshold == "adaptive":
        threshold = background_threshold(result.error, result.lung, result.processed, det.lam)
    else:
        threshold = fixed_threshold(result.error, result.lung, result.processed, det.fixed_threshold)
    result.mask = binarise(
        result.error, result.lung, result.processed, threshold, det.crf, det.crf_iterations, det.morphology_radius
    )
    result.threshold = threshold
    result.detect = det
    result.report.update(
        {
            "lambda": det.lam,
            "threshold": dataclasses.asdict(threshold),
            "crf": det.crf,
            "processed_slices": result.processed.tolist(),
            "quantification": quantify(result.mask, result.lung, result.reference.GetSpacing()),
        }
    )
    return result
