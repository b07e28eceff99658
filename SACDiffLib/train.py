"""Training on healthy scans (Algorithm 1, Section 3.2): AdamW, cosine decay, EMA, bf16 on CUDA, resume, DDP.

Data: a folder laid out like ``../shared/data`` — ``cases.json`` beside ``ct/<case>_ct.nii.gz`` and
``ct/<case>_lung.nii.gz``. Cases whose ``diagnosis`` is ``normal`` are used whole; with
``include_uninfected_slices`` the slices of other cases labelled 0 in ``slice_label_infection`` are added too.
Lesion labels are never read.

Multi-GPU / multi-node: launch the same command under ``torchrun``; each rank draws its own batches
(seed, rank, step) and DistributedDataParallel averages the gradients. Rank 0 writes the checkpoint.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import io
from .checkpoint import build, read_checkpoint, save_checkpoint
from .data import case_path, healthy_cases, holdout_split, load_cases
from .distributed import Distributed
from .config import SACDiffConfig, derive, from_dict
from .errors import SACDiffError
from .progress import Progress, keep_going


COMPILE_NOISE_FROM_STEPS = 200  # shorter trainings (tests, demos) do not repay the compilation


def _slice_lists(used) -> list:
    """``load_training_slices``' (case, slice indices) list, as plain names and ints (a checkpoint's copy compares
    equal to a fresh one)."""
    return [(str(name), [int(i) for i in z]) for name, z in (used or [])]


def _describe(used: list) -> str:
    return ", ".join(f"{name} ({len(z)} slices)" for name, z in used) or "no slices"


def load_training_slices(data_dir, cfg: SACDiffConfig, include_uninfected_slices: bool = False,
                         normal_cases: Optional[list] = None, split: str = "train", eight_bit: bool = False):
    """(images (N, C, S, S) in [−1, 1], lung masks (N, 1, S, S), list of (case, slice indices)); C = 1, or the slice
    and its neighbours for a 2.5D model (``io.model_inputs``; a neighbour may lie in a held-out slab: it is healthy
    context, never a training target of its own).

    Healthy cases are those with diagnosis exactly ``normal``, or the cases named in ``normal_cases`` (e.g. to add
    one described as "normal-looking lungs"). ``split`` "train" gives the training slices, "holdout" the slabs
    that ``cfg.train.holdout_every`` keeps out of training (``holdout_split``). ``eight_bit``: the same slices, each
    passed through an 8-bit lung-window JPEG first (``validate.eight_bit_slice``; neighbours too)."""
    data_dir = Path(data_dir)
    pre = cfg.preprocess
    images, masks, used = [], [], []
    cases = load_cases(data_dir)
    healthy = healthy_cases(cases, normal_cases)
    for name, info in sorted(cases.items()):
        normal = name in healthy
        labels = info.get("slice_label_infection")
        if not normal and not (include_uninfected_slices and labels is not None):
            continue
        ct_path, lung_path = case_path(data_dir, name, "ct"), case_path(data_dir, name, "lung")
        if not ct_path.exists() or not lung_path.exists():
            raise SACDiffError(f"case {name}: expected {ct_path} and {lung_path}")
        ct = io.read_ct(ct_path)
        hu = io.ct_array(ct)
        lung = io.read_mask(lung_path, ct)
        z = io.lung_slices(lung, pre.min_lung_fraction)
        if not normal:
            z = np.array([i for i in z if i < len(labels) and labels[i] == 0], dtype=np.int64)
        z = holdout_split(z, cfg.train.holdout_every)[0 if split == "train" else 1]
        if z.size == 0:
            continue
        offset = io.neighbour_offset(ct.GetSpacing()[2], cfg.model.context_mm)
        if eight_bit:
            from .experiments.validate import eight_bit_slice

            reach = np.unique(np.concatenate(io.context_indices(z, offset, cfg.model.context_slices, hu.shape[0])))
            hu = hu.astype(np.float32)  # only the slices that training reads (and their neighbours) are converted
            hu[reach] = np.stack([eight_bit_slice(hu[i]) for i in reach])
        image, mask = io.model_inputs(hu, lung, pre, z, offset, cfg.model.context_slices)
        images.append(image)
        masks.append(mask)
        used.append((name, [int(i) for i in z]))
    if not images:
        raise SACDiffError(
            f"no training slices in {data_dir}: no case has diagnosis 'normal' (or uninfected slices with "
            "--include-uninfected-slices)"
        )
    return torch.cat(images), torch.cat(masks), used


def augment(x: torch.Tensor, c: torch.Tensor, generator: torch.Generator):
    """Small rotations (±10°), scales (0.9–1.1), shifts (±4 %) and intensity jitter (±3 % gain, ±0.03 offset)."""
    n = x.shape[0]
    u = lambda *shape: torch.rand(shape, generator=generator, device=generator.device).to(x.device)  # noqa: E731
    angle = (u(n) * 2 - 1) * math.radians(10)
    scale = 1 + (u(n) * 2 - 1) * 0.1
    shift = (u(n, 2) * 2 - 1) * 0.04
    x, c = affine_warp(x, c, angle, scale, shift)
    gain = 1 + (u(n, 1, 1, 1) * 2 - 1) * 0.03
    offset = (u(n, 1, 1, 1) * 2 - 1) * 0.03
    return ((x + 1) * gain - 1 + offset).clamp(-1, 1), c


def affine_warp(x: torch.Tensor, mask: torch.Tensor, angle: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor):
    """Images in [−1, 1] (N, C, H, W) and their masks (N, 1, H, W) rotated by ``angle`` (radians), zoomed by
    ``scale`` and shifted by ``shift`` (N, 2; in units of half the image), per sample; air (−1) and no-mask (0) come
    in at the border, the mask stays binary. The one affine augmentation of the diffusion and the lung network."""
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1  # pad with air
    mask = (F.grid_sample(mask, grid, mode="bilinear", padding_mode="zeros", align_corners=False) > 0.5).float()
    return x, mask


def cosine_lr(step: int, cfg) -> float:
    """Linear warm-up, then cosine decay to 0 over ``cfg.steps`` (multiplier of cfg.lr)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _initial_networks(cfg: SACDiffConfig, device, resumed: Optional[dict], init: Optional[str]):
    """(model, its EMA copy, diffusion) on ``device``: seeded fresh weights (identical on every rank), a resumed
    checkpoint's weights and EMA, or ``init``'s weights (warm start; its EMA weights when present)."""
    torch.manual_seed(cfg.train.seed)
    model, diffusion = build(cfg, noise_seed=cfg.train.seed)
    model.to(device)
    diffusion.to(device)
    if resumed:
        model.load_state_dict(resumed["model"])
    elif init:
        source = read_checkpoint(init)
        weights = source.get("ema") or source["model"]
        try:
            model.load_state_dict(inflated(weights, model.state_dict()))
        except RuntimeError:
            raise SACDiffError(f"--init {init}: its network does not have the shape of this preset's network; "
                               "warm-start only from a checkpoint of the same widths and blocks") from None
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    if resumed and resumed.get("ema"):
        ema.load_state_dict(resumed["ema"])
    return model, ema, diffusion


def inflated(weights: dict, target: dict) -> dict:
    """A 2D network's weights (``weights``) for a 2.5D network of the same widths (``target``'s shapes): the first
    convolution keeps the slice's and the lung mask's filters and starts the neighbours' at zero, the last one
    keeps the slice's ε̂ and starts each neighbour's at zero — the 2.5D model begins as the 2D one for the slice,
    blind to its neighbours (whose fields are independent of the slice's: predicting them as the slice's would cost
    twice the loss of predicting 0). Equal shapes are copied as they are (float32)."""
    out = {}
    for name, value in weights.items():
        value = value.float()
        want = target.get(name)
        if want is not None and want.shape != value.shape:
            if name == "conv_in.weight" and value.shape[1] == 2 and want.shape[1] > 2:
                grown = torch.zeros(want.shape)
                grown[:, 0], grown[:, -1] = value[:, 0], value[:, 1]  # [x_t ⊕ c] → [x_t, neighbours…, c]
                value = grown
            elif name.startswith("conv_out.") and value.shape[0] == 1:
                grown = torch.zeros(want.shape)
                grown[0] = value[0]
                value = grown
        out[name] = value
    return out


def _ranks_in_sync(model) -> bool:
    """True when every DDP rank holds the same weights (a checksum gathered from all ranks)."""
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    gathered = [torch.zeros_like(checksum) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, checksum)
    return bool(all(torch.equal(g, gathered[0]) for g in gathered))


def train(
    cfg: SACDiffConfig,
    data_dir,
    out_path,
    device: torch.device = torch.device("cpu"),
    resume: Optional[str] = None,
    include_uninfected_slices: bool = False,
    steps: Optional[int] = None,
    progress: Optional[Progress] = None,
    normal_cases: Optional[list] = None,
    init: Optional[str] = None,
) -> dict:
    """Train (or resume) and write the checkpoint to ``out_path``. Returns a summary (steps, final loss, time).

    With ``resume`` the configuration comes from that checkpoint (``cfg`` is ignored); ``steps`` overrides the
    total number of optimisation steps in either case. ``init`` starts a new training from the weights of another
    checkpoint whose network has the same shape (warm start; its EMA weights when present)."""
    out_path = Path(out_path)
    train_state = payload = None
    if resume:
        payload = read_checkpoint(resume)
        cfg = from_dict(payload["config"])
        train_state = payload.get("train_state")
        if not train_state:
            raise SACDiffError(f"{resume} holds no training state (optimizer, step); it cannot be resumed")
    cfg = derive(cfg, train={"steps": None if steps is None else int(steps)})  # validated; the caller's cfg unchanged
    tc = cfg.train
    ddp = Distributed(device)
    device = ddp.device
    first_run = (payload.get("extra") or {}) if resume else {}
    recorded = _slice_lists(first_run.get("training_data"))
    if recorded and normal_cases is None and not include_uninfected_slices:
        normal_cases = sorted({name for name, _ in recorded})  # a resumed training keeps the cases it trained on
    images, masks, used = load_training_slices(data_dir, cfg, include_uninfected_slices, normal_cases)
    given = _slice_lists(used)
    if recorded and given != recorded:
        raise SACDiffError(
            f"--resume {resume}: it trained on {_describe(recorded)}, but {data_dir} with these options gives "
            f"{_describe(given)}; resume with the same data and --normal-cases / --include-uninfected-slices as "
            "the first run")
    if init is None:
        init = first_run.get("init")  # a resumed training keeps the record of where its first run warm-started
    images, masks = images.to(device), masks.to(device)
    eight_bit_images = None
    if tc.eight_bit_fraction > 0:  # the same slices as 8-bit pictures, row for row
        eight_bit_images = load_training_slices(data_dir, cfg, include_uninfected_slices, normal_cases,
                                                eight_bit=True)[0].to(device)

    model, ema, diffusion = _initial_networks(cfg, device, payload if resume else None, init)
    net = torch.nn.parallel.DistributedDataParallel(model) if ddp.active else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, tc))
    start = 0
    losses: list[float] = []
    if train_state:
        optimizer.load_state_dict(train_state["optimizer"])
        scheduler.load_state_dict(train_state["scheduler"])
        start = int(train_state["step"])
        losses = list(train_state.get("losses", []))
    if tc.steps - start >= COMPILE_NOISE_FROM_STEPS:
        diffusion.compile_noise()  # seconds to compile, then ≈ 8× faster fields on the CPU (SimplexNoise.compile)
    use_amp = tc.mixed_precision and device.type == "cuda"

    def save(step: int, **more):
        if ddp.main:
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                     "losses": losses}
            extra = {"training_data": used, "world_size": ddp.world, "steps_done": step, "init": init, **more}
            save_checkpoint(out_path, cfg, model, ema, state, extra)

    t0 = time.perf_counter()
    step = start
    try:
        for step in range(start, tc.steps):
            # One generator per (seed, rank, step): resuming reproduces the same batches and noise.
            gen = torch.Generator(device=device).manual_seed(tc.seed * 1_000_003 + ddp.rank * 10_007 + step)
            idx = torch.randint(0, images.shape[0], (tc.batch_size,), generator=gen, device=device)
            x0, c = images[idx], masks[idx]
            if eight_bit_images is not None:  # drawn only when on: older trainings keep their batches and noise
                pick = torch.rand(tc.batch_size, generator=gen, device=device) < tc.eight_bit_fraction
                x0 = torch.where(pick[:, None, None, None], eight_bit_images[idx], x0)
            if tc.augment:
                x0, c = augment(x0, c, gen)
            net.train()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                loss = diffusion.training_loss(
                    lambda x_t, cc, t: net(x_t, cc, t).float(), x0, c if cfg.model.conditional else None, gen,
                    max_timestep=tc.max_timestep,
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            scheduler.step()
            with torch.no_grad():  # EMA of the weights
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm, 1 - tc.ema_decay)
                for be, bm in zip(ema.buffers(), model.buffers()):
                    be.copy_(bm)
            value = float(loss.detach())
            losses.append(round(value, 6))
            if not keep_going(progress, (step + 1) / tc.steps, f"step {step + 1}/{tc.steps}, loss {value:.4f}, "
                          f"lr {scheduler.get_last_lr()[0]:.2e}"):
                save(step + 1)
                break
            if tc.save_every and (step + 1) % tc.save_every == 0 and step + 1 < tc.steps:
                save(step + 1)
        else:
            step = tc.steps - 1
    except KeyboardInterrupt:
        save(step)  # resumable with --resume
        raise
    done = min(step + 1, tc.steps)
    summary = {"steps": done, "final_loss": losses[-1] if losses else float("nan"),
               "seconds": time.perf_counter() - t0, "slices": int(images.shape[0]), "cases": used,
               "world_size": ddp.world}
    if ddp.active:  # every rank must hold the same weights after DDP; record the check
        summary["ranks_in_sync"] = _ranks_in_sync(model)
    save(done, ranks_in_sync=summary.get("ranks_in_sync", True))
    ddp.close()
    return summary
