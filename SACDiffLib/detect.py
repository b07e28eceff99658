"""Detection (Algorithm 2, Sections 2.4–2.5, 3.2): ensemble reconstruction and the volume driver.

``reconstruct_ensemble`` is pure tensors in, tensors out: K members of the partial chain T_s → 0, batched as
members × slices. Every slice of a volume sees the same noise field per member and step (Section 3.2: a fixed seed
gives one noise pattern per volume, which keeps neighbouring slices consistent); members get different fields.
Each field is drawn once per volume (one generator, one field per member and timestep); the network then runs
over chunks of slices (``batch_size``) within each step, so the noise and the updates do not depend on the chunk
size (only the network's batch arithmetic can, in the last bits).

``detect_volume`` reads the CT geometry, selects lung slices, moves them to the model grid, runs the ensemble, maps
error / uncertainty / pseudo-healthy back to the CT grid and binarises the error (``postprocess``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from contextlib import nullcontext
from typing import Optional

import numpy as np
import SimpleITK as sitk
import torch

from . import io
from .config import DetectConfig, SACDiffConfig, validate
from .diffusion import Diffusion
from .errors import SACDiffError
from .lung import exclude_airways as exclude_airways_from
from .lung import LungSource, body_mask, lung_labels, segment_lungs
from .postprocess import rethreshold
from .result import DetectionResult, detection_facts
from .progress import Progress, keep_going, log



def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SACDiffError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise SACDiffError(f"device {device!r} unknown; choose auto, cpu or cuda")
    return torch.device(device)


CROP_MARGIN = 8  # model-grid pixels of air kept around the body's bounding box


def crop_box(region: torch.Tensor, multiple: int, margin: int = CROP_MARGIN) -> tuple[slice, slice]:
    """In-plane bounding box of ``region`` (S, 1, H, W) over all slices, widened by ``margin`` and to a multiple of
    ``multiple`` (the UNet's size multiple), kept inside the grid. The whole grid when the region is empty.

    Detection passes the body and the lung: the box's edges then lie in the air around the patient, where the
    UNet's zero padding meets what it met at the image border in training. A box cut through the body (the lung's
    box) makes the network paint an air band along the cut, ≈ 15 pixels deep, in the reconstruction."""
    h, w = region.shape[-2:]
    rows = torch.nonzero(region.amax(dim=(0, 1, 3)) > 0).flatten()
    cols = torch.nonzero(region.amax(dim=(0, 1, 2)) > 0).flatten()
    if rows.numel() == 0:
        return slice(0, h), slice(0, w)

    def span(lo: int, hi: int, size: int) -> slice:
        lo, hi = max(0, lo - margin), min(size, hi + 1 + margin)
        length = min(size, -(-(hi - lo) // multiple) * multiple)
        lo = max(0, min(lo - (length - (hi - lo)) // 2, size - length))
        return slice(lo, lo + length)

    return span(int(rows[0]), int(rows[-1]), h), span(int(cols[0]), int(cols[-1]), w)


def auto_chunk(slices: int, ensemble: int, height: int, width: int, base_channels: int, device: torch.device) -> int:
    """Slices per forward chunk so that the K × chunk batch fits: about 24 activations of the first level's width
    live at once (measured peak of the UNet forward, bf16 on CUDA / fp32 on CPU). Budget: half the free CUDA
    memory, or 2 GiB of host memory on the CPU (larger batches do not run faster there)."""
    bytes_per = 2 if device.type == "cuda" else 4
    per_slice = ensemble * height * width * base_channels * bytes_per * 24
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = free // 2
    else:
        budget = 2 << 30
    return int(max(1, min(slices, budget // max(per_slice, 1))))


def prepare_model(model: torch.nn.Module, device: torch.device, compile_model: bool = False):
    """The network as detection runs it: channels_last (CUDA: faster convolutions with bf16 autocast; CPU: oneDNN's
    convolutions 1.22× faster on the shipped model, 24 × 208 × 256 batch, 2 cores — outputs differ from the
    NCHW layout's in the last bits, |Δε̂| ≤ 6e-5) and, with
    ``compile_model``, ``torch.compile`` (CUDA: mode "reduce-overhead", i.e. CUDA graphs for the fixed-shape reverse
    loop; CPU: inductor's default). Returns a callable and whether it is compiled. The compiled module is cached
    on the model so that chunks and volumes reuse it; any failure falls back to the eager model."""
    model = model.to(memory_format=torch.channels_last)
    if not compile_model:
        return model, False
    compiled = model.__dict__.get("_sacdiff_compiled")  # (not an attribute: nn.Module would register it)
    if compiled is None:
        try:
            compiled = torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else None, dynamic=False)
        except Exception as exc:  # no compiler / unsupported platform
            log.warning(f"note: torch.compile unavailable ({type(exc).__name__}: {exc}); running the eager model")
            compiled = model
        model.__dict__["_sacdiff_compiled"] = compiled
    return compiled, compiled is not model


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


# Noise pixels a detection must draw before compiling the simplex kernel pays off (≈ 3000 fields of 256², ≈ 170 s
# of eager noise on one core, against ≈ 11 s to compile): the paper preset on a CPU, never the fast settings.
COMPILE_NOISE_FROM_PIXELS = 2e8


@torch.inference_mode()
def reconstruct_ensemble(
    model: torch.nn.Module,
    diffusion: Diffusion,
    x: torch.Tensor,
    cond: Optional[torch.Tensor],
    steps: int,
    ensemble: int,
    seed: int = 0,
    *,
    batch_size: int = 0,
    progress: Optional[Progress] = None,
    sampling_steps: int = 0,
    box: Optional[tuple[slice, slice]] = None,
    stats: Optional[dict] = None,
    compile_model: bool = False,
    harmonise_steps: int = 0,
    lung: Optional[torch.Tensor] = None,
    harmonise_radius: int = 1,
) -> torch.Tensor:
    """K pseudo-healthy reconstructions of every slice: x (S, 1, H, W) in [−1, 1] → (K, S, 1, H, W).

    ``box`` (rows, cols) restricts the network to that in-plane window: the noise fields are drawn on the whole
    H × W grid and cropped, so only the UNet's view of the border changes; outside the box the reconstruction is
    the query itself (no error). ``harmonise_steps`` > 0 runs the harmonised reverse chain
    (``Diffusion.partial_chain``) with the blend of ``harmonised_x0`` inside ``lung`` (S, 1, H, W; required then).
    ``batch_size`` 0 picks the chunk from the memory budget (``auto_chunk``); a CUDA
    out-of-memory error halves the chunk and redoes the network's part of that step. Memory: the state of all
    slices (K × S × box) plus one step's K fields, never all steps' fields. ``stats`` receives the chunk size used,
    the number of retries and the seconds spent drawing noise.
    """
    s, _, h, w = x.shape
    k = ensemble
    rows, cols = box if box is not None else (slice(0, h), slice(0, w))
    xc = x[:, :, rows, cols]
    cc = None if cond is None else cond[:, :, rows, cols]
    hc, wc = xc.shape[-2:]
    device = x.device
    if batch_size > 0:
        chunk = max(1, min(batch_size, s))
    else:
        chunk = auto_chunk(s, k, hc, wc, getattr(getattr(model, "cfg", None), "channels", (32,))[0], device)
    retries = 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    net, compiled = prepare_model(model, device, compile_model)
    fields = k * len(diffusion.sampling_timesteps(steps, sampling_steps))
    if compile_model or fields * h * w >= COMPILE_NOISE_FROM_PIXELS:
        diffusion.compile_noise()  # seconds to compile once, then ≈ 8× faster fields (SimplexNoise.compile)
    eager = [not compiled]

    def forward(x_t, c, t):
        x_t = x_t.contiguous(memory_format=torch.channels_last)
        with autocast:
            if not eager[0]:
                try:
                    return net(x_t, c, t).float()
                except Exception as exc:  # a compile error surfaces at the first call: fall back for good
                    if _is_oom(exc):
                        raise
                    log.warning(f"note: torch.compile failed ({type(exc).__name__}); running the eager model")
                    eager[0] = True
            return model(x_t, c, t).float()

    def eps_model(x_t, c, t):
        """ε̂ for a part (K, n, 1, hc, wc) of the state, as K × n images; a CUDA out-of-memory error halves the
        slices per forward from then on and redoes the part."""
        nonlocal chunk, retries
        n = x_t.shape[1]
        while True:
            try:
                out = [forward(x_t[:, a:a + chunk].reshape(-1, 1, hc, wc),
                               None if c is None else c[:, a:a + chunk].reshape(-1, 1, hc, wc),
                               t[:1].repeat(k * min(chunk, n - a))).view(k, -1, 1, hc, wc)
                       for a in range(0, n, chunk)]
                return out[0] if len(out) == 1 else torch.cat(out, 1)
            except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError
                if not _is_oom(exc) or chunk == 1:
                    raise
                del exc
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                chunk, retries = max(1, chunk // 2), retries + 1

    # One generator for the volume: the fields of (member k, timestep t) are drawn once and shared by every slice.
    generator = torch.Generator(device=device).manual_seed(seed)
    noise_seconds = 0.0

    def noise(_t: int) -> torch.Tensor:  # (K, 1, 1, hc, wc): the same field for every slice of member k
        nonlocal noise_seconds
        t0 = time.perf_counter()
        z = diffusion.sample_noise(k, h, w, generator, device=device)[:, :, rows, cols]
        noise_seconds += time.perf_counter() - t0  # (asynchronous on CUDA: a lower bound there)
        return z.unsqueeze(1)

    def on_step(done: float, total: int):
        return keep_going(progress, done / total, f"reverse step {math.ceil(done)}/{total}, {s} slices")

    x0 = xc.unsqueeze(0).expand(k, s, 1, hc, wc)
    c0 = None if cc is None else cc.unsqueeze(0).expand(k, s, 1, hc, wc)
    parts = [(slice(None), slice(a, a + chunk)) for a in range(0, s, chunk)]
    harmonise = None
    if harmonise_steps > 0:
        if lung is None:
            raise ValueError("the harmonised reverse chain needs the lung mask (lung=)")
        region = lung[:, :, rows, cols].unsqueeze(0).expand(k, s, 1, hc, wc) > 0.5

        def harmonise(x0_hat, part):
            return harmonised_x0(x0_hat, x0[part], region[part], harmonise_radius)

    recon = diffusion.partial_chain(eps_model, x0, c0, steps, noise, on_step, sampling_steps, parts,
                                    harmonise, harmonise_steps)
    out = x.unsqueeze(0).repeat(k, 1, 1, 1, 1).float()
    out[:, :, :, rows, cols] = recon
    if stats is not None:
        stats.update({"chunk_slices": chunk, "oom_retries": retries, "compiled": not eager[0],
                      "noise_s": round(noise_seconds, 3)})
    return out


HARMONISE_SCALES = 4.0  # weight 0 up to this many robust scales (1.4826·MAD) above the lung's median, 1 from twice
HARMONISE_GROW = 2  # pixels the weight is grown by (max filter): a lesion's rim goes with the lesion


def harmonised_x0(x0_hat: torch.Tensor, query: torch.Tensor, region: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """x̂₀ʰ = w·x̂₀ + (1 − w)·x of the harmonised reverse chain, per image (last two dims) of (…, 1, H, W) tensors.

    w = clamp(z / S − 1, 0, 1) with z = (r − median_lung r) / (1.4826 · MAD_lung r) and S = HARMONISE_SCALES:
    0 up to S robust σ (the residual's own noise, whose tails would otherwise be grown into weight), 1 from 2S;
    r = |mean of (x̂₀ − x) over (2·radius + 1)² pixels| (the signed difference averaged first: a structure the step
    only blurred or shifted keeps its mass and averages out, a lesion it removed does not); w grown by
    HARMONISE_GROW pixels; w = 1 outside ``region`` (the lung): the body keeps the plain
    chain, so the background error — and α with it (Section 2.4) — is the plain chain's. Where x̂₀ and the query
    agree as well as most of the lung does (healthy parenchyma, vessels the step already restores), the query's own
    tissue is carried into the next, shallower step; where x̂₀ departs far from it (a lesion the deep start
    removed), x̂₀ is kept. An image without lung voxels keeps x̂₀ unchanged."""
    import torch.nn.functional as F

    shape = x0_hat.shape
    flat = lambda v: v.reshape(-1, 1, *shape[-2:])  # noqa: E731
    r = flat((x0_hat - query).float())
    if radius > 0:  # the mean of the SIGNED difference: a vessel the deep step only blurred or moved keeps its mass
        r = F.avg_pool2d(r, 2 * radius + 1, 1, radius, count_include_pad=False)  # (≈ 0 after averaging); a removed
    r = r.abs()  # lesion's mass is gone (large)
    inside = flat(region)
    values = torch.where(inside, r, torch.full_like(r, float("nan"))).flatten(1)
    median = values.nanmedian(dim=1).values
    scale = 1.4826 * (values - median[:, None]).abs().nanmedian(dim=1).values
    median, scale = median.view(-1, 1, 1, 1), scale.view(-1, 1, 1, 1)
    z = (r - median) / scale.clamp_min(1e-6)  # robust z-score of the residual within the slice's lung
    w = ((z - HARMONISE_SCALES) / HARMONISE_SCALES).clamp(0, 1)  # 0 up to 4 robust σ, 1 from 8: noise stays 0
    w = F.max_pool2d(w, 2 * HARMONISE_GROW + 1, 1, HARMONISE_GROW)
    w = torch.where(inside & torch.isfinite(w), w, torch.ones_like(w)).to(x0_hat.dtype)
    return (w * flat(x0_hat) + (1 - w) * flat(query)).view(shape)


def tolerant_residual(x: torch.Tensor, recon: torch.Tensor, radius: int) -> torch.Tensor:
    """Signed residual x − x̂ that ignores a shift of up to ``radius`` pixels: 0 where x lies between the min and
    max of x̂ over the (2r + 1)² neighbourhood, else the distance to the nearer of them (positive: x brighter than
    anything nearby in x̂ — hyperdense; negative: darker — hypodense; both kept). radius 0 = x − x̂."""
    if radius <= 0:
        return x - recon
    import torch.nn.functional as F

    shape = recon.shape
    flat = recon.reshape(-1, 1, *shape[-2:])
    high = F.max_pool2d(flat, 2 * radius + 1, 1, radius).view(shape)
    low = -F.max_pool2d(-flat, 2 * radius + 1, 1, radius).view(shape)
    return (x - high).clamp_min(0) - (low - x).clamp_min(0)


def network_evaluations(det: DetectConfig) -> int:
    """UNet evaluations per slice: K members × the reverse steps actually run."""
    return det.ensemble * (len(Diffusion.sampling_timesteps(det.steps, det.sampling_steps)) - 1)


def _box_fraction(box, size: int) -> float:
    return (box[0].stop - box[0].start) * (box[1].stop - box[1].start) / size**2


def _box_on_ct_grid(box: tuple[slice, slice], size: int, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """The model-grid box mapped back through ``io.from_model_grid``: (y0, y1, x0, x1) on the CT's in-plane grid."""
    grid = torch.zeros((1, 1, size, size))
    grid[..., box[0], box[1]] = 1.0
    inside = io.from_model_grid(grid, shape)[0] > 0.5
    ys, xs = torch.nonzero(inside.any(1)).flatten(), torch.nonzero(inside.any(0)).flatten()
    if ys.numel() == 0:
        return (0, shape[0], 0, shape[1])
    return (int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1)


def error_maps(x: torch.Tensor, members: torch.Tensor, kind: str = "mean-of-errors", shift_tolerance: int = 0,
               error_radius: int = 0):
    """(E, uncertainty, pseudo-healthy) from the query x (S,1,H,W) and members (K,S,1,H,W).

    mean-of-errors: E = (1/K) Σ_k (x − x̂₀ᵏ)²  (the issue's reading; = (x − x̄₀)² + σ², so it also counts the
    members' disagreement). error-of-mean: E = (x − x̄₀)² (Section 2.5's "averaged ... stable estimate").
    ``shift_tolerance`` r > 0 replaces x − x̂ by ``tolerant_residual`` (no error for a shift of ≤ r pixels);
    ``error_radius`` r > 0 replaces it by its mean over (2r + 1)² pixels (``local_mean``) before squaring.
    Uncertainty σ = population std over members (Section 2.5); pseudo-healthy x̄₀ = member mean.
    """
    mean = members.mean(0)
    std = members.std(0, unbiased=False) if members.shape[0] > 1 else torch.zeros_like(mean)
    if kind == "mean-of-errors":
        err = local_mean(tolerant_residual(x.unsqueeze(0), members, shift_tolerance), error_radius).pow(2).mean(0)
    else:
        err = local_mean(tolerant_residual(x, mean, shift_tolerance), error_radius).pow(2)
    return err, std, mean


def local_mean(residual: torch.Tensor, radius: int) -> torch.Tensor:
    """The signed residual averaged over (2r + 1)² in-plane pixels (the window clipped at the image's edge); r 0 =
    unchanged. A structure the reconstruction only blurred or moved leaves a residual of zero mass (a vessel's
    core minus its blurred copy, a dipole), which averages out; a lesion it removed leaves its whole contrast."""
    if radius <= 0:
        return residual
    import torch.nn.functional as F

    shape = residual.shape
    flat = residual.reshape(-1, 1, *shape[-2:])
    return F.avg_pool2d(flat, 2 * radius + 1, 1, radius, count_include_pad=False).view(shape)


def prepare_lung(ct: sitk.Image, hu: np.ndarray, lung_path=None, exclude_airways: bool = True,
                 source: LungSource = LungSource(), body: Optional[np.ndarray] = None) -> tuple[np.ndarray, str]:
    """(lung labels 1 right / 2 left, where they came from): the given mask (completed by the learned mask when
    ``source.complete``) or the automatic one of ``source.method``, without the trachea and main bronchi unless
    ``exclude_airways`` is off."""
    if lung_path is None:
        if source.method == "learned":
            from .lungnet import learned_lungs

            lung = learned_lungs(hu, ct, source.model, airways=not exclude_airways)
            origin = "automatic (SACDiff lung network" + (f" {source.model})" if source.model else ", shipped)")
        else:
            lung, origin = segment_lungs(hu, ct, airways=not exclude_airways), "automatic (classical threshold fallback)"
    else:
        lung, how = lung_labels(io.read_mask(lung_path, ct), ct, body_mask(hu) if body is None else body)
        origin = f"{lung_path} ({how})"
        if source.complete:
            from .lungnet import complete_lung, learned_lungs

            before = int((lung > 0).sum())
            lung = complete_lung(lung, learned_lungs(hu, ct, source.model, airways=True))
            origin += f", completed by the lung network (+{int((lung > 0).sum()) - before} voxels)"
        if exclude_airways:
            lung = exclude_airways_from(hu, lung, ct)
    return lung, origin + ("" if not exclude_airways else "; trachea and main bronchi excluded")


def detect_volume(
    ct_path,
    model: torch.nn.Module,
    diffusion: Diffusion,
    cfg: SACDiffConfig,
    lung_path=None,
    device: torch.device = torch.device("cpu"),
    progress: Optional[Progress] = None,
    compile_model: bool = False,
    lung_source: LungSource = LungSource(),
) -> DetectionResult:
    """Run SAC-Diff on one CT file / DICOM folder with the settings in ``cfg.detect``; the lung mask from
    ``lung_path`` or as ``lung_source`` says."""
    validate(cfg)
    det, pre = cfg.detect, cfg.preprocess
    timings = {}
    t0 = time.perf_counter()
    ct = io.read_ct(ct_path)
    hu = io.ct_array(ct)
    timings["read_s"] = time.perf_counter() - t0
    t_lung = time.perf_counter()
    body = body_mask(hu)  # once: the given mask's sides (lung_labels) and the background of α (postprocess)
    lung, lung_origin = prepare_lung(ct, hu, lung_path, det.exclude_airways, lung_source, body)
    timings["lung_mask_s"] = time.perf_counter() - t_lung
    processed = io.lung_slices(lung, pre.min_lung_fraction)
    if processed.size == 0:
        raise SACDiffError(
            f"no slice has ≥ {pre.min_lung_fraction:.1%} lung in the lung mask; check that the mask belongs to "
            "this CT and covers the lungs"
        )

    t1 = time.perf_counter()
    x, c = (t.to(device) for t in io.model_inputs(hu[processed], lung[processed], pre))
    cond = c if cfg.model.conditional else None
    body_c = io.to_model_grid(torch.from_numpy(body[processed]), pre.image_size, 0.0, mask=True).to(device)
    box = crop_box(torch.maximum(c, body_c), cfg.model.size_multiple)
    chunk_stats: dict = {}
    members = reconstruct_ensemble(
        model, diffusion, x, cond, det.steps, det.ensemble, det.seed, batch_size=det.batch_size, progress=progress,
        sampling_steps=det.sampling_steps, box=box if det.crop_to_lung else None, stats=chunk_stats,
        compile_model=compile_model, harmonise_steps=det.harmonise_steps, lung=c,
        harmonise_radius=det.harmonise_radius,
    )
    err, std, mean = error_maps(x, members, det.error, det.shift_tolerance, det.error_radius)
    if not (torch.isfinite(err).all() and torch.isfinite(mean).all()):
        raise SACDiffError("the reconstruction holds NaN/infinite values (a broken model or numeric overflow); "
                           "nothing was written — check the model with `sacdiff validate` or retrain it")
    shape = hu.shape[1:]
    err_ct = io.from_model_grid(err, shape).cpu().numpy()
    std_ct = io.from_model_grid(std, shape).cpu().numpy()
    mean_ct = io.from_model_grid(mean, shape).cpu().numpy()
    timings["diffusion_s"] = time.perf_counter() - t1  # network + noise + reverse updates
    timings["noise_s"] = chunk_stats.get("noise_s", 0.0)

    error = np.zeros(hu.shape, np.float32)
    error[processed] = np.maximum(err_ct, 0)
    uncertainty = np.zeros(hu.shape, np.float32)
    uncertainty[processed] = std_ct * io.hu_per_unit(pre)
    pseudo = hu.copy()
    pseudo[processed] = io.unwindow(mean_ct.clip(-1, 1), pre)
    result = DetectionResult(reference=ct, ct_hu=hu, lung=lung, processed=processed, error=error,
                             uncertainty_hu=uncertainty, pseudo_healthy_hu=pseudo, detect=det,
                             box=_box_on_ct_grid(box, pre.image_size, shape), body=body)
    t2 = time.perf_counter()
    rethreshold(result, det.lam)
    timings["postprocess_s"] = time.perf_counter() - t2
    timings["total_s"] = time.perf_counter() - t0
    result.facts = detection_facts(
        ct_path=ct_path, ct_fingerprint=io.fingerprint(ct_path), lung_origin=lung_origin, device=device,
        timings=timings, network_evaluations=network_evaluations(det) * processed.size,
        processed_voxel_fraction=processed.size / hu.shape[0] * (
            _box_fraction(box, pre.image_size) if det.crop_to_lung else 1.0),
        chunk=chunk_stats, config=dataclasses.asdict(cfg))
    return result
