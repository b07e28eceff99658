"""``sacdiff benchmark``: speed figures measured in one run, each next to its baseline.

So far: simplex noise (torch, batched) against ``opensimplex`` on the same fields, and the cost of one detection
step (K members × slices through the UNet + noise + reverse update) for a preset. Timings are medians of repeats.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import opensimplex
import torch

from .checkpoint import build
from .config import preset
from .detect import resolve_device
from .noise import SimplexNoise


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_noise(size: int = 128, fields: int = 8, device: str = "cpu", repeats: int = 3) -> dict:
    """Single-octave fields: opensimplex.noise2array vs SimplexNoise on the same coordinates; and 6-octave fields
    per second in torch (what detection needs)."""
    coords = np.arange(size) * 2.0**-6
    opensimplex.seed(0)
    t_ref = _median_time(lambda: opensimplex.noise2array(coords, coords), max(1, repeats - 2))
    dev = torch.device(device)
    noise = SimplexNoise(0)
    xs = torch.tensor(coords, dtype=torch.float32, device=dev)
    batch_x = xs.view(1, 1, -1) + torch.arange(fields, device=dev).view(-1, 1, 1) * 37.0
    batch_y = xs.view(1, -1, 1).expand(fields, -1, 1)

    def torch_fields():
        noise.noise2(batch_x, batch_y)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    torch_fields()
    t_torch = _median_time(torch_fields, repeats) / fields
    gen = torch.Generator(device=dev).manual_seed(0)

    def octave_fields():
        noise.octaves(fields, size, size, gen, device=dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    t_oct = _median_time(octave_fields, repeats) / fields
    return {"size": size, "opensimplex_s_per_field": t_ref, "torch_s_per_field": t_torch,
            "speedup": t_ref / t_torch, "torch_6_octave_fields_per_s": 1.0 / t_oct, "device": str(dev)}


def bench_detection_step(preset_name: str = "demo", slices: int = 8, device: str = "cpu", repeats: int = 3) -> dict:
    """One reverse step of the ensemble: UNet on K × slices, a fresh noise field per member, the μ/σ update."""
    cfg = preset(preset_name)
    dev = torch.device(device)
    model, diffusion = build(cfg)
    model.to(dev).eval()
    diffusion.to(dev)
    k, s = cfg.detect.ensemble, cfg.preprocess.image_size
    x = torch.randn(k * slices, 1, s, s, device=dev)
    c = torch.ones_like(x)
    t = torch.full((k * slices,), cfg.detect.steps, device=dev)
    gen = torch.Generator(device=dev).manual_seed(0)

    @torch.inference_mode()
    def step():
        eps = model(x, c, t)
        z = diffusion.sample_noise(k, s, s, gen, device=dev).repeat_interleave(slices, 0)
        diffusion.p_step(x, cfg.detect.steps, eps, z)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    step()
    seconds = _median_time(step, repeats)
    return {"preset": preset_name, "image_size": s, "ensemble": k, "slices": slices, "s_per_step": seconds,
            "evaluations_per_s": k * slices / seconds, "device": str(dev),
            "volume_estimate_s": seconds * cfg.detect.steps}


def run_benchmark(device: str = "auto", quick: bool = False, log=print) -> dict:
    dev = str(resolve_device(device))
    results = {"threads": torch.get_num_threads()}
    n = bench_noise(64 if quick else 128, 4 if quick else 8, "cpu", 3)
    results["noise_cpu"] = n
    log(f"noise, one {n['size']}² single-octave field on CPU: opensimplex {n['opensimplex_s_per_field'] * 1e3:.1f} ms, "
        f"torch {n['torch_s_per_field'] * 1e3:.2f} ms → {n['speedup']:.0f}× ; "
        f"6-octave fields: {n['torch_6_octave_fields_per_s']:.0f}/s")
    if dev.startswith("cuda"):
        g = bench_noise(512, 64, dev, 5)
        results["noise_cuda"] = g
        log(f"noise on {dev}: 512² field {g['torch_s_per_field'] * 1e6:.0f} µs; "
            f"6-octave fields {g['torch_6_octave_fields_per_s']:.0f}/s")
    for name in (("tiny",) if quick else ("demo", "fast")):
        d = bench_detection_step(name, 4 if quick else 8, dev, 3)
        results[f"step_{name}"] = d
        log(f"detection step, preset {name} ({d['image_size']}², K={d['ensemble']} × {d['slices']} slices) on "
            f"{d['device']}: {d['s_per_step'] * 1e3:.1f} ms = {d['evaluations_per_s']:.0f} UNet evaluations/s "
            f"(T_s steps ≈ {d['volume_estimate_s']:.0f} s for these slices)")
    return results
