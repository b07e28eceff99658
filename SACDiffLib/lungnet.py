"""A learned, pathology-inclusive lung mask: SACDiff's own lung segmentation network.

Why: detection only scores what lies inside the lung mask, and the mask's condition tells the model where to put
lung (Section 2.3). A threshold mask (``lung.segment_lungs``) cuts dense consolidation and pleural-based masses
out, because they have soft-tissue density; this network learns the lung's *shape and position* instead of its
density, so such lesions stay inside the mask and the model is asked to put lung there.

How it learns that without pathology-inclusive labels (none exist in the shared data): it trains on healthy CTs
and their airway-free threshold masks, and at training time draws synthetic pathology into the lung while the
label stays "lung" (``synthetic_pathology``): consolidation lying against the chest wall (dependent, i.e.
posterior, and anywhere), pleural-based solid masses, wedge-shaped collapse from the pleura, and ground glass,
with partial-volume edges, texture and air bronchograms; plus scanner variation (noise, blur/sharpening, in-plane
scale and rotation, intensity offset).

The network is SACDiff's conditional UNet (``unet.UNet``) at a small width: the centre slice is the image input and
its two neighbours at ±``context_mm`` enter through the condition channels (2.5D), the timestep is fixed at 0.
Output: a lung logit per pixel on the 256² model grid, mapped back to the CT grid; then the two largest components,
holes filled per slice, the trachea and main bronchi taken out as for every mask, and the right/left split.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from . import __version__, io
from .atomic import replaced_file
from .config import ModelConfig
from .errors import SACDiffError
from .lung import airway_tree, segment_lungs, split_left_right
from .progress import Progress, keep_going
from .train import affine_warp
from .unet import UNet

FORMAT = "sacdiff-lungnet"
FORMAT_VERSION = 1
SHIPPED_LUNG_MODEL = "sacdiff-lungnet.pt"
# A chest CT through the lungs has slices with far more lung than this (a single MedSeg slice ≈ 150 cm²); a scan
# whose largest slice of lung is smaller does not show the lungs: it is refused, not guessed.
MIN_LUNG_AREA_MM2 = 1000.0


@dataclass(frozen=True)
class LungNetConfig:
    """Network and preprocessing of the lung network (stored in its checkpoint)."""

    image_size: int = 128  # network grid (pixels); edges are refined on the CT grid (``learned_lungs``)
    channels: tuple[int, ...] = (16, 32, 64, 96, 128)
    hu_window: tuple[float, float] = (-1024.0, 600.0)  # wide: air, lung, soft tissue and bone apart
    context_mm: float = 3.0  # neighbouring slices at ± this distance (at least one slice away)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "LungNetConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise SACDiffError(f"lung model config has unknown fields {unknown}; use a lung model of this version")
        cfg = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
        lo, hi = cfg.hu_window
        if not (64 <= cfg.image_size <= 1024 and cfg.image_size % 2 ** (len(cfg.channels) - 1) == 0
                and all(isinstance(c, int) and c > 0 and c % 8 == 0 for c in cfg.channels)
                and math.isfinite(lo) and math.isfinite(hi) and lo < hi
                and math.isfinite(cfg.context_mm) and 0 < cfg.context_mm <= 20):
            raise SACDiffError("lung model config out of range (image size, widths, HU window or context); "
                               "the file is damaged or was edited — retrain it with `sacdiff train-lungmask`")
        return cfg


def build_lungnet(cfg: LungNetConfig) -> UNet:
    """The UNet of ``unet.py`` with one residual block per module; its condition input carries the two neighbouring
    slices, so the first convolution takes 3 channels (centre ⊕ neighbours)."""
    net = UNet(ModelConfig(channels=cfg.channels, blocks_per_module=1, bottleneck_blocks=1, conditional=True))
    net.conv_in = nn.Conv2d(3, cfg.channels[0], 3, padding=1)
    return net


def logits(net: UNet, stack: torch.Tensor) -> torch.Tensor:
    """(N, 3, S, S) slice stacks → (N, 1, S, S) lung logits."""
    t = torch.zeros(stack.shape[0], device=stack.device)
    return net(stack[:, :1], stack[:, 1:], t)


def window(hu: np.ndarray, cfg: LungNetConfig) -> np.ndarray:
    lo, hi = cfg.hu_window
    return ((np.clip(hu, lo, hi) - lo) / (hi - lo) * 2 - 1).astype(np.float32)


def slice_stacks(hu: np.ndarray, z: np.ndarray, spacing_z: float, cfg: LungNetConfig) -> torch.Tensor:
    """(N, 3, S, S) in [−1, 1] on the model grid: slice z and its neighbours ``cfg.context_mm`` away
    (``io.slice_stack``: the edge slice repeated at the ends of the scan)."""
    return io.slice_stack(hu, z, io.neighbour_offset(spacing_z, cfg.context_mm), 1, cfg.image_size,
                          lambda v: window(v, cfg))


# ---------------------------------------------------------------------------------------------------- training data

def _hu_units(hu: float, cfg: LungNetConfig) -> float:
    lo, hi = cfg.hu_window
    return (hu - lo) / (hi - lo) * 2 - 1


# Kinds of synthetic pathology and how often each is drawn. Round two (2026-11-29, lungmask.md) added "whole": a
# whole lung's cross-section consolidated (white-out, the thin consolidated crescent at the diaphragm), with
# ground glass grading into dense consolidation towards the back (gravity) in half of the large lesions.
PATHOLOGY_KINDS = {"dependent": 0.2, "pleural": 0.12, "mass": 0.13, "wedge": 0.1, "ground-glass": 0.13,
                   "lobar": 0.17, "whole": 0.15}


HU_CHANGED = 100.0  # a pixel that synthetic pathology changed by more than this counts as lesion (evaluation)


def gravity_target(region: np.ndarray, yy: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Target HU per pixel of a large dependent lesion: ground glass (−700…−350 HU) at the ``region``'s front row,
    grading to dense consolidation (−60…+70 HU) at its back row (larger y = posterior), as gravity leaves it."""
    rows = np.nonzero(region.any(1))[0]
    back = np.clip((yy - rows[0]) / max(rows[-1] - rows[0], 1), 0, 1) ** rng.uniform(0.5, 1.5)
    front, dense = rng.uniform(-700, -350), rng.uniform(-60, 70)
    return front + (dense - front) * back


def synthetic_pathology(stack: np.ndarray, lung: np.ndarray, rng: np.random.Generator, cfg: LungNetConfig,
                        pixel_mm: float, kinds: Optional[tuple] = None) -> np.ndarray:
    """Draw 1–4 lesions into the lung of one training stack (3, S, S) (windowed units; the same lesion in the
    three slices, as a lesion spans neighbouring slices). The lung label does not change. Kinds
    (``PATHOLOGY_KINDS``, or only ``kinds``): consolidation along the pleura (posterior = dependent, or anywhere),
    a pleural-based solid mass, a wedge of collapse from the pleura, ground glass, most of a lung's cross-section
    (lobar consolidation), a whole lung's cross-section (white-out); soft edges (partial volume), texture, air
    bronchograms in consolidation, and a gravity gradient (ground glass in front, dense behind) in large ones."""
    out = stack.copy()
    if lung.sum() < 200:
        return out
    depth = ndimage.distance_transform_edt(lung)  # pixels from the lung's edge, inside
    edge = np.argwhere(lung & (depth <= 1.5))
    ys = np.argwhere(lung)[:, 0]
    posterior = edge[edge[:, 0] > np.percentile(ys, 60)]
    yy, xx = np.mgrid[: lung.shape[0], : lung.shape[1]]
    rim = ndimage.binary_dilation(lung, iterations=1)  # a soft edge may reach one pixel past the lung, no further
    names = list(kinds or PATHOLOGY_KINDS)
    weights = np.array([PATHOLOGY_KINDS[k] for k in names])
    for _ in range(int(rng.integers(1, 5))):
        kind = rng.choice(names, p=weights / weights.sum())
        pool = posterior if kind == "dependent" and len(posterior) else edge
        cy, cx = pool[rng.integers(len(pool))]
        dist = np.hypot(yy - cy, xx - cx)
        mm = lambda lo, hi: rng.uniform(lo, hi) / pixel_mm  # noqa: E731  a length in pixels
        if kind in ("dependent", "pleural"):  # a band along the pleura
            region = lung & (depth < mm(4, 35)) & (dist < mm(15, 90))
        elif kind == "mass":  # round, centred a little inside the pleura, touching it
            r = mm(5, 35)
            iy, ix = np.unravel_index(np.argmax(np.where(dist < r * 0.7, depth, -1)), lung.shape)
            region = lung & (np.hypot(yy - iy, xx - ix) < r)
        elif kind == "wedge":  # lens from the pleura towards the hilum
            r = mm(15, 60)
            region = lung & (dist < r) & (depth < 0.6 * (r - dist) + 2)
        elif kind == "lobar":  # most of a lung's cross-section, from the pleura inwards (lobar pneumonia)
            region = lung & (dist < mm(40, 160)) & (depth < mm(10, 90))
        elif kind == "whole":  # the whole cross-section of the lung at (cy, cx), perhaps a thin aerated core left
            parts, _ = ndimage.label(lung)
            region = (parts == parts[cy, cx]) & (depth < mm(15, 200))
        else:
            region = lung & (dist < mm(10, 60))
        rough = ndimage.gaussian_filter(rng.normal(size=lung.shape), 3.0)
        region &= rough > -0.5 * (rough.std() + 1e-6)  # irregular outline
        if region.sum() < 10:
            continue
        if kind == "ground-glass" or (kind == "lobar" and rng.random() < 0.4):
            target, blend = rng.uniform(-750, -300), rng.uniform(0.6, 0.95)
        else:
            target, blend = rng.uniform(-60, 70), rng.uniform(0.85, 1.0)
        if kind in ("lobar", "whole") and rng.random() < 0.5:  # gravity: ground glass in front, dense behind
            target = gravity_target(region, yy, rng)
        alpha = ndimage.gaussian_filter(region.astype(np.float32), rng.uniform(0.6, 1.5)) * blend * rim
        # texture: fine mottling, or a coarse reticular pattern (crazy paving, fibrosis)
        texture = ndimage.gaussian_filter(rng.normal(size=lung.shape), rng.choice([1.0, 2.0])) * rng.uniform(5, 25)
        if rng.random() < 0.3:
            texture *= 4
        value = (np.float32(_hu_units(0.0, cfg)) + (np.asarray(target, np.float32) + texture.astype(np.float32))
                 * np.float32(2 / (cfg.hu_window[1] - cfg.hu_window[0])))
        keep_air = np.zeros(lung.shape, bool)
        if kind != "ground-glass" and rng.random() < 0.5:  # air bronchograms: dark branches stay dark
            keep_air = stack[0] < _hu_units(-900, cfg)
        for c in range(3):
            a = alpha * rng.uniform(0.7, 1.0) if c else alpha
            out[c] = np.where(keep_air, out[c], out[c] + a * (value - out[c]))
    return out


def scanner_variation(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator, cfg: LungNetConfig):
    """Batch (N, 3, S, S), labels (N, 1, S, S): in-plane zoom 0.8–1.6 (field of view, up to images cropped to the
    chest), rotation ±12°, shift ±5 %,
    noise 0–35 HU, blur (σ ≤ 1.2 px) or sharpening, intensity offset ±40 HU, and for half of the batch the clipping
    of an 8-bit lung-window picture."""
    n = x.shape[0]
    u = lambda *shape: torch.rand(shape, generator=generator)  # noqa: E731
    angle = (u(n) * 2 - 1) * math.radians(12)
    scale = 0.8 + 0.8 * u(n)
    shift = (u(n, 2) * 2 - 1) * 0.05
    x, y = affine_warp(x, y, angle, scale, shift)
    hu_unit = 2 / (cfg.hu_window[1] - cfg.hu_window[0])
    kernel = torch.tensor([1.0, 2.0, 1.0]) / 4
    smooth = F.conv2d(F.pad(x.reshape(-1, 1, *x.shape[-2:]), (1, 1, 1, 1), mode="replicate"),
                      (kernel[:, None] * kernel[None, :]).view(1, 1, 3, 3)).view_as(x)
    mix = (u(n, 1, 1, 1) * 2.4 - 1.2).clamp(-0.8, 1.0)  # > 0 blur, < 0 sharpen (unsharp mask)
    x = x + mix * (smooth - x)
    x = x + torch.randn(x.shape, generator=generator) * (u(n, 1, 1, 1) * 35 * hu_unit)
    x = x + (u(n, 1, 1, 1) * 2 - 1) * 40 * hu_unit
    # 8-bit pictures windowed for the lung (e.g. the MedSeg JPEGs): half of the batch clipped to a random window
    # (low −1250…−950 HU, high −150…+350 HU), then back on the network's window
    lo = _hu_units(-1100.0, cfg) + (u(n, 1, 1, 1) * 2 - 1) * 150 * hu_unit
    hi = _hu_units(100.0, cfg) + (u(n, 1, 1, 1) * 2 - 1) * 250 * hu_unit
    clip = u(n, 1, 1, 1) < 0.5
    x = torch.where(clip, torch.minimum(torch.maximum(x, lo), hi), x)
    return x.clamp(-1, 1), y


def training_slices(data_dir, cfg: LungNetConfig, cases: Optional[list] = None, holdout_every: int = 4,
                    split: str = "train"):
    """(stacks (N, 3, S, S) float16, labels (N, 1, S, S) uint8, pixel size in mm (N,), [(case, z list)]).

    Cases: ``cases`` or every case of ``cases.json`` whose diagnosis mentions "normal" (aerated lungs, where the
    threshold mask is right). Label: the case's lung mask without the trachea and main bronchi. Every slice of the
    scan is used (slices without lung teach the network to find none); slabs of HOLDOUT_SLAB slices, every
    ``holdout_every``-th, are held out (``data.holdout_split``) for the Dice check."""
    from .data import case_path, holdout_split, load_cases

    index = load_cases(data_dir)
    names = sorted(cases) if cases else sorted(n for n, d in index.items() if "normal" in str(d.get("diagnosis", "")))
    unknown = sorted(set(names) - set(index))
    if unknown or not names:
        raise SACDiffError(f"no usable cases for the lung network in {data_dir} (unknown: {unknown}); name healthy "
                           "cases with --cases or mark them diagnosis 'normal' in cases.json")
    stacks, labels, pixel, used = [], [], [], []
    for name in names:
        ct = io.read_ct(case_path(data_dir, name, "ct"))
        hu = io.ct_array(ct)
        lung = io.read_mask(case_path(data_dir, name, "lung"), ct) > 0
        lung &= ~airway_tree(hu, lung, ct)
        z = holdout_split(np.arange(hu.shape[0]), holdout_every)[0 if split == "train" else 1]
        stacks.append(slice_stacks(hu, z, ct.GetSpacing()[2], cfg).half())
        labels.append(io.to_model_grid(torch.from_numpy(lung[z]), cfg.image_size, 0.0, mask=True).to(torch.uint8))
        sx, sy = ct.GetSpacing()[:2]
        pixel.append(torch.full((z.size,), max(hu.shape[1] * sy, hu.shape[2] * sx) / cfg.image_size))
        used.append((name, [int(i) for i in z]))
    return torch.cat(stacks), torch.cat(labels), torch.cat(pixel), used


def loss_fn(logit: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy + soft Dice (the Dice term keeps small lungs at the apex and base from being ignored)."""
    bce = F.binary_cross_entropy_with_logits(logit, label)
    p = torch.sigmoid(logit)
    dice = 1 - (2 * (p * label).sum() + 1) / (p.sum() + label.sum() + 1)
    return bce + dice


# ---------------------------------------------------------------------------------------------------- checkpoints

def save_lungnet(path, cfg: LungNetConfig, net: nn.Module, state: Optional[dict] = None, extra: Optional[dict] = None,
                 half: bool = False) -> Path:
    weights = {k: (v.detach().cpu().half() if half and v.is_floating_point() else v.detach().cpu())
               for k, v in net.state_dict().items()}
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "sacdiff_version": __version__,
               "config": cfg.to_dict(), "model": weights, "train_state": state, "extra": extra or {}}
    path = Path(path)
    with replaced_file(path) as tmp:
        torch.save(payload, tmp)
    return path


def read_lungnet(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SACDiffError(f"lung model {path} does not exist; pass --lung-model with a file from "
                           "`sacdiff train-lungmask`, or use --lung-method classical")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SACDiffError(f"lung model {path} is corrupt or not a torch file ({type(exc).__name__}); "
                           "re-download or retrain it") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise SACDiffError(f"{path} is not a SACDiff lung model; pass a file from `sacdiff train-lungmask`")
    if payload.get("format_version") != FORMAT_VERSION:
        raise SACDiffError(f"{path} has lung-model format {payload.get('format_version')}, this SACDiff reads "
                           f"{FORMAT_VERSION}; retrain it")
    return payload


def is_lungnet_file(path) -> bool:
    try:
        read_lungnet(path)
        return True
    except SACDiffError:
        return False


def slim_lungnet(src, dst, half: bool = True) -> Path:
    """The shipping form of a lung network: its weights (float16 unless ``half`` is off), config and provenance,
    without the optimiser state; loads through ``load_lungnet`` like any other."""
    payload = read_lungnet(src)
    cfg = LungNetConfig.from_dict(payload["config"])
    net = build_lungnet(cfg)
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in payload["model"].items()})
    extra = dict(payload.get("extra") or {}, slimmed_from=Path(src).name,
                 stored_dtype="float16" if half else "float32")
    out = save_lungnet(dst, cfg, net, None, extra, half=half)
    load_lungnet(out)  # the slim file passes the same checks
    return out


def load_lungnet(path=None) -> tuple[LungNetConfig, UNet, dict]:
    """(config, network in eval mode, payload); the shipped lung model when ``path`` is None."""
    path = shipped_lung_model_path() if path is None else path
    payload = read_lungnet(path)
    cfg = LungNetConfig.from_dict(payload["config"])
    net = build_lungnet(cfg)
    weights = {k: v.float() if v.is_floating_point() else v for k, v in payload["model"].items()}
    if any(v.is_floating_point() and not torch.isfinite(v).all() for v in weights.values()):
        raise SACDiffError(f"lung model {path} holds NaN/infinite weights; retrain it")
    try:
        net.load_state_dict(weights)
    except RuntimeError:
        raise SACDiffError(f"lung model {path}: its weights do not fit its config; the file is damaged") from None
    return cfg, net.eval(), payload


def shipped_lung_model_path() -> Path:
    from .checkpoint import find_shipped

    path, looked = find_shipped(SHIPPED_LUNG_MODEL)
    if path is None:
        raise SACDiffError(f"the shipped lung model {SHIPPED_LUNG_MODEL} is not installed (looked in {looked}); use "
                           "--lung-method classical or pass --lung-model")
    return path


# ---------------------------------------------------------------------------------------------------- training

def train_lungnet(data_dir, out_path, steps: Optional[int] = None, batch_size: int = 8, lr: float = 2e-3, seed: int = 0,
                  resume=None, cases: Optional[list] = None, holdout_every: int = 4, save_every: int = 200,
                  pathology: float = 0.8, progress: Optional[Progress] = None,
                  cfg: LungNetConfig = LungNetConfig(), init=None) -> dict:
    """Train (or resume) the lung network and write it to ``out_path`` (every ``save_every`` steps, on cancel and
    at the end; ``resume`` continues a checkpoint's optimiser, schedule and step, with its own total of steps
    unless ``steps`` is given; ``init`` starts from another lung network's weights and config with a fresh optimiser
    and schedule). Batches are drawn from a
    generator seeded by (seed, step): a resumed training draws the same batches as an uninterrupted one."""
    if steps is not None and steps < 1 or batch_size < 1 or not (0 < lr < 1) or save_every < 0 or not 0 <= pathology <= 1:
        raise SACDiffError("train-lungmask: --steps and --batch-size must be ≥ 1, --lr in (0, 1), --save-every ≥ 0")
    state, init_weights = None, None
    if resume:
        payload = read_lungnet(resume)
        cfg = LungNetConfig.from_dict(payload["config"])
        state = payload.get("train_state")
        if not state:
            raise SACDiffError(f"{resume} holds no training state; it cannot be resumed")
        seed, batch_size, lr, holdout_every = (state["settings"][k] for k in ("seed", "batch_size", "lr", "holdout_every"))
        cases = state["settings"]["cases"]
        steps = steps or int(state["settings"]["steps"])  # the run's own schedule unless asked otherwise
        init = state["settings"].get("init")
    elif init:
        start_from = read_lungnet(init)
        cfg = LungNetConfig.from_dict(start_from["config"])
        init_weights = {k: v.float() if v.is_floating_point() else v for k, v in start_from["model"].items()}
        init = Path(init).name
    steps = steps or 3000
    stacks, labels, pixel, used = training_slices(data_dir, cfg, cases, holdout_every)
    lung_slices = torch.nonzero(labels.flatten(1).sum(1) > 0).flatten()
    torch.manual_seed(seed)
    net = build_lungnet(cfg)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    schedule = lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    start, losses = 0, []
    if init_weights is not None:
        net.load_state_dict(init_weights)
    if state:
        net.load_state_dict(payload["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, losses = int(state["step"]), list(state["losses"])
    settings = {"seed": seed, "batch_size": batch_size, "lr": lr, "holdout_every": holdout_every,
                "cases": [name for name, _ in used], "pathology": pathology, "steps": steps, "init": init,
                "pathology_kinds": PATHOLOGY_KINDS}

    def save(step: int):
        extra = {"training_data": used, "steps_done": step, "settings": settings, "seconds": round(spent(), 1)}
        save_lungnet(out_path, cfg, net, {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                          "step": step, "losses": losses, "settings": settings,
                                          "seconds": spent()}, extra)

    t0 = time.perf_counter()
    previous = float(state.get("seconds", 0.0)) if state else 0.0
    spent = lambda: previous + time.perf_counter() - t0  # noqa: E731
    step = start
    try:
        for step in range(start, steps):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
            rng = np.random.default_rng([seed, step])
            # Two thirds of each batch from slices with lung, the rest from any slice.
            pick = torch.randint(0, lung_slices.numel(), (batch_size,), generator=gen)
            idx = torch.where(torch.rand(batch_size, generator=gen) < 0.67, lung_slices[pick],
                              torch.randint(0, stacks.shape[0], (batch_size,), generator=gen))
            x = stacks[idx].float().numpy()
            y = labels[idx].float()
            for i in range(batch_size):
                if rng.random() < 0.15:  # no neighbours (a single slice, e.g. a 2D image): the centre repeated
                    x[i, 1:] = x[i, :1]
                if rng.random() < pathology:
                    x[i] = synthetic_pathology(x[i], y[i, 0].numpy() > 0, rng, cfg, float(pixel[idx[i]]))
            x, y = scanner_variation(torch.from_numpy(x), y, gen, cfg)
            net.train()
            loss = loss_fn(logits(net, x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise SACDiffError(f"train-lungmask: the loss became {value} at step {step + 1}; lower --lr")
            losses.append(round(value, 5))
            if not keep_going(progress, (step + 1) / steps, f"step {step + 1}/{steps}, loss {value:.4f}"):
                save(step + 1)
                break
            if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
                save(step + 1)
        else:
            step = steps - 1
    except KeyboardInterrupt:
        save(step)
        raise
    done = min(step + 1, steps)
    save(done)
    return {"steps": done, "final_loss": losses[-1] if losses else float("nan"), "seconds": spent(),
            "slices": int(stacks.shape[0]), "cases": [n for n, _ in used]}


# ---------------------------------------------------------------------------------------------------- inference

@torch.inference_mode()
def lung_probability(hu: np.ndarray, image: sitk.Image, net: UNet, cfg: LungNetConfig, batch: int = 16,
                     progress: Optional[Progress] = None) -> np.ndarray:
    """P(lung) per voxel (z, y, x), float32, on the CT grid."""
    out = np.zeros(hu.shape, np.float32)
    z_all = np.arange(hu.shape[0])
    for start in range(0, hu.shape[0], batch):
        z = z_all[start:start + batch]
        p = torch.sigmoid(logits(net, slice_stacks(hu, z, image.GetSpacing()[2], cfg)))
        out[z] = io.from_model_grid(p, hu.shape[1:]).numpy()
        if not keep_going(progress, min(1.0, (start + batch) / hu.shape[0]), "lung mask"):
            from .errors import Cancelled

            raise Cancelled("lung mask cancelled")
    return out


EDGE_MM = 3.0  # the network's edge is trusted to about one pixel of its grid: aerated voxels this far outside join
# Inward, the network's mask is kept whole (round four, Resources/results/lungmask.md): handing the 3 mm inside its
# edge to the threshold cut dense disease against the pleura (severe synthetic pathology inside 92.6 % → 96.8 %).
INWARD_EDGE_MM = 0.0


def learned_lungs(hu: np.ndarray, image: sitk.Image, model_path=None, airways: bool = False,
                  progress: Optional[Progress] = None, inward_mm: float = INWARD_EDGE_MM) -> np.ndarray:
    """Pathology-inclusive lung labels (1 right, 2 left) of a CT (z, y, x) in HU, without the trachea and main
    bronchi unless ``airways``. Refuses a scan in which it finds no pair of lungs."""
    if hu.ndim != 3:
        raise SACDiffError("lung segmentation needs a 3D CT")
    cfg, net, _ = load_lungnet(model_path)
    return lungs_from_probability(hu, lung_probability(hu, image, net, cfg, progress=progress), image, airways,
                                  inward_mm)


def lungs_from_probability(hu: np.ndarray, probability: np.ndarray, image: sitk.Image, airways: bool = False,
                           inward_mm: float = INWARD_EDGE_MM) -> np.ndarray:
    """``learned_lungs`` after the network: P(lung) > 0.5, edges refined (``refine_edges``), the two largest
    components, holes filled per slice, the airways removed, right/left labels."""
    mask = refine_edges(hu, probability > 0.5, image, inward_mm)
    labels, n = ndimage.label(mask)
    if n:
        sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
        order = np.argsort(sizes)[::-1]
        keep = [order[0] + 1] + ([order[1] + 1] if n > 1 and sizes[order[1]] >= 0.1 * sizes[order[0]] else [])
        mask = np.isin(labels, keep)
        for z in range(mask.shape[0]):
            mask[z] = ndimage.binary_fill_holes(mask[z])
    sx, sy = image.GetSpacing()[:2]
    largest = float(mask.reshape(mask.shape[0], -1).sum(1).max()) * sx * sy if mask.size else 0.0
    if largest < MIN_LUNG_AREA_MM2:
        raise SACDiffError(f"the lung network found at most {largest / 100:.0f} cm² of lung in any slice (less than "
                           f"{MIN_LUNG_AREA_MM2 / 100:.0f}): this does not look like a chest CT through the lungs; "
                           "give a lung mask with --lung")
    if not airways:
        # The network was taught to leave the trachea out, so its mask may hold no trachea to start the airway
        # tracking from; track it in the union with the threshold mask (which always holds the trachea) instead.
        try:
            air = segment_lungs(hu, image, airways=True) > 0
        except SACDiffError:
            air = np.zeros_like(mask)
        mask &= ~airway_tree(hu, mask | air, image)
    return split_left_right(mask, image)


def refine_edges(hu: np.ndarray, learned: np.ndarray, image: sitk.Image,
                 inward_mm: float = INWARD_EDGE_MM) -> np.ndarray:
    """The network's mask with its edges placed on the CT grid: aerated voxels (< −320 HU) within EDGE_MM outside
    the network's mask, plus the network's mask shrunk by ``inward_mm`` (where the network says lung well inside,
    density does not matter: consolidation stays; within ``inward_mm`` of its edge the threshold decides, so a
    dense rim against the pleura is cut there — 0 keeps all of the network's mask). In-plane only, slice by slice."""
    from .lung import AIR_HU

    sx, sy = image.GetSpacing()[:2]
    plane = ndimage.generate_binary_structure(3, 1)
    plane[0] = plane[2] = False
    grown = ndimage.binary_dilation(learned, structure=plane, iterations=max(1, int(round(EDGE_MM / min(sx, sy)))))
    inward = int(round(inward_mm / min(sx, sy)))
    core = ndimage.binary_erosion(learned, structure=plane, iterations=inward, border_value=1) if inward else learned
    return core | (grown & (hu < AIR_HU))


def complete_lung(given: np.ndarray, learned: np.ndarray) -> np.ndarray:
    """A given lung mask completed with the learned mask's parts that it lacks and that touch it (e.g. dense
    consolidation a threshold mask cut out); labels of the given mask kept, added parts labelled by the learned
    mask's side. Nothing of the given mask is removed."""
    added = (learned > 0) & (given == 0)
    parts, n = ndimage.label(added)
    if not n:
        return given.copy()
    near = ndimage.binary_dilation(given > 0, iterations=1)
    touching = np.unique(parts[near & (parts > 0)])
    out = given.copy()
    take = np.isin(parts, touching[touching > 0])
    out[take] = learned[take]
    return out
