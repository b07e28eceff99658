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
from dataclasses import dataclass
from typing import Optional

import numpy as np
import SimpleITK as sitk
import torch

from . import io
from .io import crop_box
from .config import DetectConfig, Precision, ResidualSign, SACDiffConfig, choices, validate
from .diffusion import Diffusion
from .errors import SACDiffError
from .lung import exclude_airways as exclude_airways_from
from .lung import LungSource, body_mask, lung_labels, segment_lungs
from .postprocess import opened, rethreshold
from .result import DetectionResult, detection_facts
from .vessels import suppress_vessels
from .progress import Progress, keep_going, log, share



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


@dataclass(frozen=True)
class ReconstructionStats:
    """How a reconstruction ran (report.json's ``chunk``)."""

    chunk_slices: int  # slices per network forward (× K members), after any halving
    oom_retries: int  # CUDA out-of-memory errors that halved the chunk
    compiled: bool  # whether the torch.compile'd network ran (False: eager, or fell back)
    precision: str  # the network's arithmetic as it ran: "bf16" or "fp32" (``network_dtype``)
    noise_s: float  # seconds spent drawing simplex fields (a lower bound on CUDA: asynchronous)


def cpu_has_amx() -> bool:
    """Whether this CPU runs bf16 matrix tiles in hardware (Intel AMX; torch's own probe, a private API)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def network_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The network's autocast dtype at detection for ``DetectConfig.precision``: "auto" is bf16 on CUDA (tensor
    cores) and on a CPU with AMX tiles, float32 on other CPUs (bf16 is emulated there, and slower); "bf16" /
    "fp32" force one. On an AMX Xeon bf16 runs the shipped network ≈ 2.2× faster than float32 (one thread) and the
    validation's rule gives the same λ* and score (map-candidates.md round 20)."""
    if precision == "bf16" or (precision == "auto" and (device.type == "cuda" or cpu_has_amx())):
        return torch.bfloat16
    if precision in choices(Precision):
        return torch.float32
    raise SACDiffError(f"precision {precision!r} unknown; choose one of: {', '.join(choices(Precision))}")


class _Forward:
    """The network's forward as detection runs it (``prepare_model``): channels_last, autocast to ``dtype`` when it
    is not float32 (``network_dtype``), the compiled module while it works — a compile error surfaces at the first
    call, and then the eager model runs for good (an out-of-memory error is not a compile error: it is raised for
    ``_ChunkedEps`` to halve the chunk). ε̂ comes back float32 either way."""

    def __init__(self, model: torch.nn.Module, device: torch.device, compile_model: bool, dtype: torch.dtype):
        self.model = model
        self.net, self.compiled = prepare_model(model, device, compile_model)
        self.autocast = nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)

    def __call__(self, x_t, c, t):
        x_t = x_t.contiguous(memory_format=torch.channels_last)
        with self.autocast:
            if self.compiled:
                try:
                    return self.net(x_t, c, t).float()
                except Exception as exc:
                    if _is_oom(exc):
                        raise
                    log.warning(f"note: torch.compile failed ({type(exc).__name__}); running the eager model")
                    self.compiled = False
            return self.model(x_t, c, t).float()


class _ChunkedEps:
    """ε̂ for a part (K, n, C, h, w) of the state, as K × n images, ``chunk`` slices per forward; a CUDA
    out-of-memory error halves the chunk from then on and redoes the part (at one slice it is raised)."""

    def __init__(self, forward: _Forward, k: int, chunk: int, device: torch.device):
        self.forward, self.k, self.chunk, self.device, self.retries = forward, k, chunk, device, 0

    def __call__(self, x_t, c, t):
        k, n, channels, (h, w) = self.k, x_t.shape[1], x_t.shape[2], x_t.shape[-2:]
        while True:
            chunk = self.chunk
            try:
                out = [self.forward(x_t[:, a:a + chunk].reshape(-1, channels, h, w),
                                    None if c is None else c[:, a:a + chunk].reshape(-1, 1, h, w),
                                    t[:1].repeat(k * min(chunk, n - a))).view(k, -1, channels, h, w)
                       for a in range(0, n, chunk)]
                return out[0] if len(out) == 1 else torch.cat(out, 1)
            except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError
                if not _is_oom(exc) or chunk == 1:
                    raise
                del exc
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                self.chunk, self.retries = max(1, chunk // 2), self.retries + 1


class _NoiseFields:
    """The simplex fields of one volume (Section 3.2): one generator, one field per (member k, timestep, image
    channel) drawn once on the whole H × W grid and cropped to the box — the same field for every slice of member k
    (a 2.5D model's neighbour channels get fields of their own); the seconds spent drawing them are counted."""

    def __init__(self, diffusion: Diffusion, k: int, size: tuple[int, int], box: tuple[slice, slice], seed: int,
                 device: torch.device, channels: int = 1):
        self.diffusion, self.k, self.size, self.box, self.device = diffusion, k, size, box, device
        self.channels = channels
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.seconds = 0.0

    def __call__(self, _t: int) -> torch.Tensor:  # (K, 1, C, hc, wc)
        t0 = time.perf_counter()
        rows, cols = self.box
        z = self.diffusion.sample_noise(self.k, *self.size, self.generator, device=self.device,
                                        channels=self.channels)[:, :, rows, cols]
        self.seconds += time.perf_counter() - t0  # (asynchronous on CUDA: a lower bound there)
        return z.unsqueeze(1)


@torch.inference_mode()
def reconstruct_ensemble(
    model: torch.nn.Module,
    diffusion: Diffusion,
    x: torch.Tensor,
    cond: Optional[torch.Tensor],
    det: DetectConfig,
    *,
    lung: Optional[torch.Tensor] = None,
    box: Optional[tuple[slice, slice]] = None,
    progress: Optional[Progress] = None,
    compile_model: bool = False,
) -> tuple[torch.Tensor, ReconstructionStats]:
    """K = ``det.ensemble`` pseudo-healthy reconstructions of every slice from T_s = ``det.steps`` (Alg. 2, with
    ``det.sampling_steps``, ``det.seed``, ``det.batch_size``, ``det.harmonise_*``): x (S, C, H, W) in [−1, 1] →
    members (K, S, 1, H, W), and how it ran. C > 1: a 2.5D model's slice and its neighbours (channel 0 the slice),
    all noised and denoised together; the members are the slice's channel.

    ``box`` (rows, cols) restricts the network to that in-plane window: the noise fields are drawn on the whole
    H × W grid and cropped, so only the UNet's view of the border changes; outside the box the reconstruction is
    the query itself (no error). ``det.harmonise_steps`` > 0 runs the harmonised reverse chain
    (``Diffusion.partial_chain``) with the blend of ``harmonised_x0`` inside ``lung`` (S, 1, H, W; required then).
    ``det.batch_size`` 0 picks the chunk from the memory budget (``auto_chunk``). Memory: the state of all slices
    (K × S × box) plus one step's K fields, never all steps' fields.
    """
    s, channels, h, w = x.shape
    k = det.ensemble
    rows, cols = box if box is not None else (slice(0, h), slice(0, w))
    xc = x[:, :, rows, cols]
    cc = None if cond is None else cond[:, :, rows, cols]
    hc, wc = xc.shape[-2:]
    device = x.device
    if det.batch_size > 0:
        chunk = max(1, min(det.batch_size, s))
    else:
        chunk = auto_chunk(s, k, hc, wc, getattr(getattr(model, "cfg", None), "channels", (32,))[0], device)
    dtype = network_dtype(det.precision, device)
    forward = _Forward(model, device, compile_model, dtype)
    eps_model = _ChunkedEps(forward, k, chunk, device)
    fields = k * len(diffusion.sampling_timesteps(det.steps, det.sampling_steps))
    if compile_model or fields * h * w >= COMPILE_NOISE_FROM_PIXELS:
        diffusion.compile_noise()  # seconds to compile once, then ≈ 8× faster fields (SimplexNoise.compile)
    noise = _NoiseFields(diffusion, k, (h, w), (rows, cols), det.seed, device, channels)

    def on_step(done: float, total: int):
        return keep_going(progress, done / total, f"reverse step {math.ceil(done)}/{total}, {s} slices")

    x0 = xc.unsqueeze(0).expand(k, s, channels, hc, wc)
    c0 = None if cc is None else cc.unsqueeze(0).expand(k, s, 1, hc, wc)
    parts = [(slice(None), slice(a, a + chunk)) for a in range(0, s, chunk)]
    harmonise = None
    if det.harmonise_steps > 0:
        if lung is None:
            raise ValueError("the harmonised reverse chain needs the lung mask (lung=)")
        region = lung[:, :, rows, cols].unsqueeze(0).expand(k, s, channels, hc, wc) > 0.5

        def harmonise(x0_hat, part):
            return harmonised_x0(x0_hat, x0[part], region[part], det.harmonise_radius)

    recon = diffusion.partial_chain(eps_model, x0, c0, det.steps, noise, on_step, det.sampling_steps, parts,
                                    harmonise, det.harmonise_steps)
    out = x[:, :1].unsqueeze(0).repeat(k, 1, 1, 1, 1).float()
    out[:, :, :, rows, cols] = recon[:, :, :1]
    return out, ReconstructionStats(chunk_slices=eps_model.chunk, oom_retries=eps_model.retries,
                                    compiled=forward.compiled, precision="bf16" if dtype == torch.bfloat16 else "fp32",
                                    noise_s=round(noise.seconds, 3))


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
    r = local_mean(flat((x0_hat - query).float()), radius).abs()  # the SIGNED difference averaged first (local_mean)
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


def chains(det: DetectConfig) -> list[DetectConfig]:
    """The reverse chains a detection runs, each as settings of its own: Alg. 2's and, with ``deep_steps``, the deep
    one (its T_s, respaced steps and error radius; the same K, seed and noise)."""
    first = dataclasses.replace(det, deep_steps=0)
    if not det.deep_steps:
        return [first]
    return [first, dataclasses.replace(first, steps=det.deep_steps, sampling_steps=det.deep_sampling_steps,
                                       error_radius=det.deep_error_radius)]


def network_evaluations(det: DetectConfig) -> int:
    """UNet evaluations per slice: K members × the reverse steps actually run, in every chain."""
    return sum(c.ensemble * (len(Diffusion.sampling_timesteps(c.steps, c.sampling_steps)) - 1) for c in chains(det))


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
               error_radius: int = 0, residual_sign: str = "both"):
    """(E, uncertainty, pseudo-healthy) from the query x (S,1,H,W) and members (K,S,1,H,W).

    mean-of-errors: E = (1/K) Σ_k (x − x̂₀ᵏ)²  (the issue's reading; = (x − x̄₀)² + σ², so it also counts the
    members' disagreement). error-of-mean: E = (x − x̄₀)² (Section 2.5's "averaged ... stable estimate").
    min-of-errors: E = min_k (x − x̂₀ᵏ)², what no member explains: a vessel that one member invents or moves and
    another reconstructs in place scores low, a lesion that every member removes keeps its contrast.
    ``shift_tolerance`` r > 0 replaces x − x̂ by ``tolerant_residual`` (no error for a shift of ≤ r pixels);
    ``error_radius`` r > 0 replaces it by its mean over (2r + 1)² pixels (``local_mean``) before squaring;
    ``residual_sign`` "hyperdense" keeps its positive part only (x brighter than x̂), "both" keeps it whole.
    Uncertainty σ = population std over members (Section 2.5); pseudo-healthy x̄₀ = member mean.
    """
    mean = members.mean(0)
    std = members.std(0, unbiased=False) if members.shape[0] > 1 else torch.zeros_like(mean)
    if residual_sign not in choices(ResidualSign):
        raise SACDiffError(f"residual sign {residual_sign!r} unknown; choose one of: "
                           f"{', '.join(choices(ResidualSign))}")

    def squared(residual):
        residual = local_mean(residual, error_radius)
        return (residual.clamp_min(0) if residual_sign == "hyperdense" else residual).pow(2)

    if kind in ("mean-of-errors", "min-of-errors"):
        per_member = squared(tolerant_residual(x.unsqueeze(0), members, shift_tolerance))
        err = per_member.mean(0) if kind == "mean-of-errors" else per_member.amin(0)
    else:
        err = squared(tolerant_residual(x, mean, shift_tolerance))
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


@dataclass
class PreparedVolume:
    """A CT ready for the network: read, its lung mask made or read, its lung slices on the model grid."""

    ct: sitk.Image
    hu: np.ndarray  # (z, y, x) HU
    body: np.ndarray  # bool, the patient's body (``lung.body_mask``)
    lung: np.ndarray  # uint8 labels 1 right / 2 left
    lung_origin: str  # where the mask came from (report.json's ``lung_mask``)
    processed: np.ndarray  # z indices of the slices with enough lung (Section 3.1)
    x: torch.Tensor  # (S, C, H, W) the processed slices (C > 1: and their neighbours), windowed, on the model grid
    c: torch.Tensor  # (S, 1, H, W) their lung mask on the model grid (the condition, Section 2.3)
    box: tuple[slice, slice]  # the body's in-plane bounding box on the model grid (``crop_box``)


def prepare_volume(ct_path, cfg: SACDiffConfig, lung_path, lung_source: LungSource, device: torch.device,
                   timings: dict) -> PreparedVolume:
    """Read the CT, make or read the lung mask, pick the lung slices and move them to the model grid; adds
    ``read_s`` and ``lung_mask_s`` to ``timings``."""
    pre = cfg.preprocess
    t0 = time.perf_counter()
    ct = io.read_ct(ct_path)
    hu = io.ct_array(ct)
    timings["read_s"] = time.perf_counter() - t0
    t_lung = time.perf_counter()
    body = body_mask(hu)  # once: the given mask's sides (lung_labels) and the background of α (postprocess)
    lung, lung_origin = prepare_lung(ct, hu, lung_path, cfg.detect.exclude_airways, lung_source, body)
    timings["lung_mask_s"] = time.perf_counter() - t_lung
    processed = io.lung_slices(lung, pre.min_lung_fraction)
    if processed.size == 0:
        raise SACDiffError(
            f"no slice has ≥ {pre.min_lung_fraction:.1%} lung in the lung mask; check that the mask belongs to "
            "this CT and covers the lungs"
        )
    offset = io.neighbour_offset(ct.GetSpacing()[2], cfg.model.context_mm)
    x, c = (t.to(device) for t in io.model_inputs(hu, lung, pre, processed, offset, cfg.model.context_slices))
    body_c = io.to_model_grid(torch.from_numpy(body[processed]), pre.image_size, 0.0, mask=True).to(device)
    box = crop_box(torch.maximum(c, body_c), cfg.model.size_multiple)
    return PreparedVolume(ct, hu, body, lung, lung_origin, processed, x, c, box)


def map_back(volume: PreparedVolume, err: torch.Tensor, std: torch.Tensor, mean: torch.Tensor, pre) -> tuple:
    """E, σ and the member mean from the model grid to the CT grid: (error, uncertainty in HU, pseudo-healthy in
    HU), zero error and uncertainty and the CT itself on the slices that were not processed."""
    shape, processed = volume.hu.shape, volume.processed
    error = np.zeros(shape, np.float32)
    error[processed] = np.maximum(io.from_model_grid(err, shape[1:]).cpu().numpy(), 0)
    uncertainty = np.zeros(shape, np.float32)
    uncertainty[processed] = io.from_model_grid(std, shape[1:]).cpu().numpy() * io.hu_per_unit(pre)
    pseudo = volume.hu.copy()
    pseudo[processed] = io.unwindow(io.from_model_grid(mean, shape[1:]).cpu().numpy().clip(-1, 1), pre)
    return error, uncertainty, pseudo


def _chain_maps(model, diffusion: Diffusion, cfg: SACDiffConfig, volume: PreparedVolume, chain: DetectConfig,
                compile_model: bool, progress: Optional[Progress]) -> tuple:
    """One reverse chain over the volume's slices (``chain``'s T_s, steps, K) → its (E, σ, x̄₀) on the model grid
    (``error_maps``) and how it ran; a non-finite reconstruction is refused."""
    members, stats = reconstruct_ensemble(
        model, diffusion, volume.x, volume.c if cfg.model.conditional else None, chain, lung=volume.c,
        box=volume.box if chain.crop_to_lung else None, progress=progress, compile_model=compile_model)
    err, std, mean = error_maps(volume.x[:, :1], members, chain.error, chain.shift_tolerance, chain.error_radius,
                                chain.residual_sign)
    if not (torch.isfinite(err).all() and torch.isfinite(mean).all()):
        raise SACDiffError("the reconstruction holds NaN/infinite values (a broken model or numeric overflow); "
                           "nothing was written — check the model with `sacdiff validate` or retrain it")
    return err, std, mean, stats


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
    ``lung_path`` or as ``lung_source`` says: prepare, reconstruct (Alg. 2), the error maps (Section 2.5), map back,
    binarise (Section 2.4). With ``deep_steps`` a second, deeper chain's opened map joins E (``DetectConfig``)."""
    validate(cfg)
    det, pre = cfg.detect, cfg.preprocess
    timings = {}
    t0 = time.perf_counter()
    volume = prepare_volume(ct_path, cfg, lung_path, lung_source, device, timings)
    t1 = time.perf_counter()
    runs = chains(det)
    bounds = [float(b) for b in np.cumsum([0] + [network_evaluations(c) for c in runs]) / network_evaluations(det)]
    maps = [_chain_maps(model, diffusion, cfg, volume, chain, compile_model,  # progress in network evaluations
                        share(progress, bounds[i], bounds[i + 1], "deep chain" if i else ""))
            for i, chain in enumerate(runs)]
    err, std, mean, stats = maps[0]  # E, σ and x̄₀ of the first chain
    error, uncertainty, pseudo = map_back(volume, err, std, mean, pre)
    if det.deep_steps:  # round 24 (map-candidates.md): E = max(E, E_deep opened by a ball of deep_opening_mm)
        deep_error = map_back(volume, *maps[1][:3], pre)[0]
        if det.deep_opening_mm > 0:
            deep_error = opened(deep_error, det.deep_opening_mm, volume.ct.GetSpacing()[::-1])
        error = np.maximum(error, deep_error)
    timings["noise_s"] = sum(chain_stats.noise_s for *_, chain_stats in maps)
    timings["diffusion_s"] = time.perf_counter() - t1  # network + noise + reverse updates (every chain)
    vessels = None
    if det.vessel_suppression:
        t_vessels = time.perf_counter()
        error, vessels = suppress_vessels(error, volume.hu, volume.lung, volume.ct.GetSpacing())
        timings["vessels_s"] = time.perf_counter() - t_vessels
    result = DetectionResult(reference=volume.ct, ct_hu=volume.hu, lung=volume.lung, processed=volume.processed,
                             error=error, uncertainty_hu=uncertainty, pseudo_healthy_hu=pseudo, detect=det,
                             box=_box_on_ct_grid(volume.box, pre.image_size, volume.hu.shape[1:]), body=volume.body)
    t2 = time.perf_counter()
    rethreshold(result, det.lam)
    timings["postprocess_s"] = time.perf_counter() - t2
    timings["total_s"] = time.perf_counter() - t0
    processed_fraction = volume.processed.size / volume.hu.shape[0] * (
        _box_fraction(volume.box, pre.image_size) if det.crop_to_lung else 1.0)
    result.facts = detection_facts(
        ct_path=ct_path, ct_fingerprint=io.fingerprint(ct_path), lung_origin=volume.lung_origin, device=device,
        timings=timings, network_evaluations=network_evaluations(det) * volume.processed.size,
        processed_voxel_fraction=processed_fraction, chunk=dataclasses.asdict(stats),
        config=dataclasses.asdict(cfg), vessel_suppression=vessels)
    return result
