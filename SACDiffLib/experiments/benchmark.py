"""``sacdiff benchmark``: speed figures measured in one run, each next to its baseline.

- noise: torch simplex (batched, on the device) against ``opensimplex`` on the same fields;
- the network's forward as detection runs it in float32 and in bf16 (``--precision``), with whether the CPU has AMX
  tiles (bf16 in hardware) and how far ε̂ moves;
- one detection step (K members × slices through the UNet + noise + reverse update) per preset, the UNet's FLOPs
  per evaluation (torch's FLOP counter) and, on CUDA, achieved TFLOP/s against the bf16 matmul peak measured here;
- whole-volume reconstruction: the batched, lung-cropped path against a naive loop (one slice and one member at a
  time, noise from ``opensimplex`` on the CPU) on a shortened step count;
- λ re-threshold of a 512 × 512 × 80 volume against the whole-volume path (target ≤ 100 ms on the CPU);
- peak memory (host, and device on CUDA).
Timings are medians of repeats.
"""

from __future__ import annotations


import resource
import statistics
import sys
import time

import numpy as np
import opensimplex
import torch

from ..checkpoint import build
from ..config import preset
from ..config import DetectConfig
from ..detect import _Forward, cpu_has_amx, network_dtype, network_evaluations, reconstruct_ensemble
from ..distributed import resolve_device
from ..io import crop_box
from ..postprocess import rethreshold
from ..progress import log
from ..result import DetectionResult
from ..noise import RAW_OCTAVE_STD, SimplexNoise


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


def bench_noise_octaves(sizes=(128, 256, 512), device: str = "cpu", fields: int = 4, reference: bool = True) -> list:
    """One 6-octave field (ν = 2⁻⁶, γ = 0.8) per size: ``SimplexNoise`` eager, the same through ``torch.compile``
    (compile time reported apart) and, on the CPU, the ``opensimplex`` package (the reference implementation)."""
    dev = torch.device(device)
    eager, compiled = SimplexNoise(0), SimplexNoise(0).compile()
    cfg = preset("paper")
    rows = []
    for size in sizes:
        gen = torch.Generator(device=dev).manual_seed(0)

        def draw(noise):
            noise.octaves(fields, size, size, gen, device=dev)
            if dev.type == "cuda":
                torch.cuda.synchronize()

        t0 = time.perf_counter()
        draw(compiled)  # first call compiles for this shape
        compile_s = time.perf_counter() - t0
        t_eager = _median_time(lambda: draw(eager), 3) / fields
        t_compiled = _median_time(lambda: draw(compiled), 3) / fields
        row = {"size": size, "device": str(dev), "eager_ms": t_eager * 1e3, "compiled_ms": t_compiled * 1e3,
               "compile_s": compile_s, "compiled_speedup": t_eager / t_compiled}
        if reference and dev.type == "cpu":
            t_ref = _median_time(lambda: _opensimplex_octaves(cfg, size, 0), 1)
            row.update(opensimplex_ms=t_ref * 1e3, eager_vs_opensimplex=t_ref / t_eager,
                       compiled_vs_opensimplex=t_ref / t_compiled)
        rows.append(row)
    return rows


def bench_training(preset_name: str, device: str = "cpu", steps: int = 3, compile_noise: bool = True) -> dict:
    """Training throughput of a preset (synthetic batch of its size): samples/s and the share of each part of a
    step — data (batch gather + augmentation), noise (the simplex fields) and network (forward, backward, AdamW)."""
    from ..train import augment

    cfg = preset(preset_name)
    dev = torch.device(device)
    model, diffusion = build(cfg)
    if compile_noise:
        diffusion.compile_noise()
    model.to(dev)
    diffusion.to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b, size = cfg.train.batch_size, cfg.preprocess.image_size
    images = torch.rand(64, 1, size, size, device=dev) * 2 - 1
    masks = (torch.rand(64, 1, size, size, device=dev) > 0.5).float()
    parts = {"data": 0.0, "noise": 0.0, "network": 0.0}

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for step in range(steps + 1):  # the first step warms up (and compiles the noise)
        gen = torch.Generator(device=dev).manual_seed(step)
        t0 = time.perf_counter()
        idx = torch.randint(0, 64, (b,), generator=gen, device=dev)
        x0, c = augment(images[idx], masks[idx], gen)
        sync()
        t1 = time.perf_counter()
        t = torch.randint(1, diffusion.T + 1, (b,), generator=gen, device=dev)
        eps = diffusion.sample_noise(b, size, size, gen, device=dev)
        sync()
        t2 = time.perf_counter()
        loss = torch.nn.functional.mse_loss(model(diffusion.q_sample(x0, t, eps), c, t), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        t3 = time.perf_counter()
        if step:
            parts["data"] += t1 - t0
            parts["noise"] += t2 - t1
            parts["network"] += t3 - t2
    total = sum(parts.values())
    return {"preset": preset_name, "device": str(dev), "batch": b, "image_size": size,
            "samples_per_s": steps * b / total, "share": {k: v / total for k, v in parts.items()}}


def _built(preset_name: str, device: str):
    """(config, model in eval mode, diffusion, device) of a preset with random weights, on ``device``."""
    cfg = preset(preset_name)
    dev = torch.device(device)
    model, diffusion = build(cfg)
    return cfg, model.to(dev).eval(), diffusion.to(dev), dev


def bench_detection_step(preset_name: str = "demo", slices: int = 8, device: str = "cpu", repeats: int = 3) -> dict:
    """One reverse step of the ensemble: UNet on K × slices, a fresh noise field per member, the μ/σ update."""
    cfg, model, diffusion, dev = _built(preset_name, device)
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


def bench_precision(preset_name: str = "small256-context", slices: int = 8, size: int = 208, device: str = "cpu",
                    repeats: int = 3) -> dict:
    """One forward of ``slices`` images of size × 256 (the shipped network's box on a chest) through ``_Forward``
    — detection's own wrapper — in float32 and in bf16 autocast: seconds each, the ratio, max |Δε̂|."""
    cfg, model, _, dev = _built(preset_name, device)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained network's last layer is not the zeros it starts from (ε̂ would be 0 in both)
        model.conv_out.weight.copy_(torch.randn(model.conv_out.weight.shape, generator=gen) * 0.02)
    channels = cfg.model.image_channels
    x = torch.randn(slices, channels, size, 256, generator=gen).to(dev)
    c = (torch.rand(slices, 1, size, 256, generator=gen) > 0.5).float().to(dev)
    t = torch.full((slices,), cfg.detect.steps, device=dev)
    out, seconds = {}, {}
    for name in ("fp32", "bf16"):
        forward = _Forward(model, dev, False, network_dtype(name, dev))
        with torch.inference_mode():
            out[name] = forward(x, c, t)
            seconds[name] = _median_time(lambda: forward(x, c, t), repeats)
    return {"preset": preset_name, "slices": slices, "shape": [size, 256], "device": str(dev), "amx": cpu_has_amx(),
            "fp32_s": seconds["fp32"], "bf16_s": seconds["bf16"], "speedup": seconds["fp32"] / seconds["bf16"],
            "max_abs_eps_difference": (out["bf16"] - out["fp32"]).abs().max().item()}


def unet_flops(cfg, device="cpu") -> int:
    """FLOPs of one UNet evaluation on one slice (torch.utils.flop_counter; a multiply-add counts 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    model, _ = build(cfg)
    model.to(device).eval()
    s = cfg.preprocess.image_size
    x = torch.zeros(1, 1, s, s, device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x, torch.ones_like(x), torch.ones(1, dtype=torch.long, device=device))
    return int(counter.get_total_flops())


def matmul_peak_tflops(device: str) -> float:
    """Achieved bf16 matmul TFLOP/s on this GPU (8192² × 8192², the practical peak for the FLOP floor)."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    seconds = _median_time(lambda: (a @ b, torch.cuda.synchronize()), 10)
    return 2 * 8192**3 / seconds / 1e12


def _opensimplex_octaves(cfg, size: int, seed: int) -> np.ndarray:
    """Baseline noise: one multi-octave field from the opensimplex package (CPU, per call)."""
    n = cfg.diffusion.noise
    opensimplex.seed(seed)
    coords = np.arange(size, dtype=np.float64)
    total = np.zeros((size, size))
    for o in range(n.octaves):
        f = n.base_frequency * 2**o
        total += n.persistence**o * opensimplex.noise2array(coords * f + 17.0 * o, coords * f)
    return total / RAW_OCTAVE_STD if n.normalise else total


def bench_volume(preset_name: str, slices: int, steps: int, device: str, naive: bool = True) -> dict:
    """Reconstruction of ``slices`` lung slices (a synthetic lung mask covering ~45 % of the grid) for ``steps``
    reverse steps: the batched, cropped path against a naive loop over slices and members with opensimplex noise."""
    cfg, model, diffusion, dev = _built(preset_name, device)
    k, s = cfg.detect.ensemble, cfg.preprocess.image_size
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, s), torch.linspace(-1, 1, s), indexing="ij")
    lung = (((xx.abs() - 0.42) / 0.3) ** 2 + (yy / 0.6) ** 2 <= 1).float()
    c = lung.expand(slices, 1, s, s).contiguous().to(dev)
    x = (torch.rand(slices, 1, s, s, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(dev)
    box = crop_box(c, cfg.model.size_multiple)

    def batched():
        every_step = DetectConfig(steps=steps, ensemble=k, seed=0, sampling_steps=0, batch_size=0)
        reconstruct_ensemble(model, diffusion, x, c, every_step, box=box)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    batched()
    t_batched = _median_time(batched, 2)
    out = {"preset": preset_name, "image_size": s, "ensemble": k, "slices": slices, "steps": steps,
           "device": str(dev), "batched_s": t_batched,
           "box_fraction": (box[0].stop - box[0].start) * (box[1].stop - box[1].start) / s**2}
    if naive:
        @torch.inference_mode()
        def naive_loop():
            for member in range(k):
                for i in range(slices):
                    xt = x[i : i + 1]
                    for t in range(steps, 0, -1):
                        z = torch.from_numpy(_opensimplex_octaves(cfg, s, member * 1000 + t)).float().to(dev)
                        eps = model(xt, c[i : i + 1], torch.full((1,), t, device=dev))
                        xt, _ = diffusion.p_step(xt, t, eps, z.view(1, 1, s, s))
            if dev.type == "cuda":
                torch.cuda.synchronize()

        t_naive = _median_time(naive_loop, 1)
        out.update({"naive_s": t_naive, "speedup": t_naive / t_batched})
    return out


def bench_rethreshold(shape=(80, 512, 512), repeats: int = 5) -> dict:
    """λ slider path on a synthetic 512 × 512 × 80 result (two lungs, a lesion) vs the whole-volume path."""
    from scipy import ndimage

    from ..postprocess import background_threshold

    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    z, h, w = shape
    lung = np.zeros(shape, np.uint8)
    lung[5 : z - 5, h // 5 : 4 * h // 5, w // 8 : 15 * w // 32] = 1
    lung[5 : z - 5, h // 5 : 4 * h // 5, 17 * w // 32 : 7 * w // 8] = 2
    err = rng.gamma(2.0, 0.01, shape).astype(np.float32)
    err[z // 4 : z // 2, h // 3 : h // 2, w // 5 : w // 3] += 0.2
    processed = np.arange(5, z - 5)
    result = DetectionResult(reference=sitk.Image(w, h, z, sitk.sitkUInt8), ct_hu=None, lung=lung, processed=processed,
                             error=err, uncertainty_hu=None, pseudo_healthy_hu=None, detect=DetectConfig(crf=False),
                             box=(h // 6, 5 * h // 6, w // 10, 9 * w // 10))
    rethreshold(result, 1.0, crf=False)  # first call computes the background statistics
    lams = iter(np.linspace(-1, 3, repeats + 1))
    t_fast = _median_time(lambda: rethreshold(result, float(next(lams)), crf=False), repeats)

    def whole_volume():
        t = background_threshold(err, lung, processed, 1.0, box=result.box)
        mask = np.zeros(shape, bool)
        mask[processed] = err[processed] > t.alpha
        yy, xx = np.mgrid[-1:2, -1:2]
        ndimage.binary_opening(mask, structure=(yy**2 + xx**2 <= 1)[None]) & (lung > 0)

    t_whole = _median_time(whole_volume, 3)
    return {"shape": list(shape), "rethreshold_s": t_fast, "whole_volume_s": t_whole, "speedup": t_whole / t_fast}


def peak_host_memory_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / 2**20


def _rusage() -> dict:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"wall": time.perf_counter(), "user": r.ru_utime, "system": r.ru_stime, "faults": r.ru_minflt}


def _since(before: dict) -> dict:
    now = _rusage()
    return {k: now[k] - before[k] for k in now}


def volume_run(slices: int = 120, size: int = 256, train_presets=(), train_steps: int = 3,
               random_preset: str = "") -> dict:
    """Measured in THIS process (``allocator_comparison`` runs it in two children): whole-volume detection of a
    ``size``² chest phantom of ``slices`` slices (2.5 mm; ≈ 100 of them hold lung) with the shipped model's
    defaults (random small256 weights where the model is not installed; ``random_preset``: that preset's network
    with random weights, e.g. "tiny" for the quick CI run), and training samples/s per preset.
    Wall and CPU time (user, system), minor page faults (``getrusage``), noise seconds, UNet evaluations and a
    checksum of the anomaly map."""
    import hashlib
    import tempfile
    from pathlib import Path

    import SimpleITK as sitk

    from .. import allocator, io
    from ..checkpoint import load_for_detection, shipped_model_path
    from ..detect import detect_volume
    from .phantom import FOV_MM, chest_phantom

    active = allocator.keep_freed_memory()  # a no-op in the child that runs with SACDIFF_KEEP_FREED_MEMORY=0
    out = {"keep_freed_memory": active, "training": {}}
    for name in train_presets:
        before = _rusage()
        tr = bench_training(name, "cpu", train_steps, compile_noise=True)
        spent = _since(before)
        out["training"][name] = dict(tr, system_share=spent["system"] / max(spent["user"] + spent["system"], 1e-9))
    hu, lungs, _, spacing = chest_phantom(size, slices, "covid", seed=0, slice_mm=2.5)
    model_path, model_note = None, f"{random_preset or 'small256'} preset, random weights"
    if not random_preset:
        try:
            model_path, model_note = shipped_model_path(), "shipped model"
        except Exception:  # not installed: the same architecture with random weights times the same
            pass
    with tempfile.TemporaryDirectory() as tmp:
        ref = sitk.GetImageFromArray(hu)
        ref.SetSpacing(spacing)
        ref.SetOrigin((-FOV_MM / 2, -FOV_MM / 2, 0.0))
        ct_path, lung_path = Path(tmp) / "ct.nii.gz", Path(tmp) / "lung.nii.gz"
        io.write_image(hu, ref, ct_path)
        io.write_image(lungs, ref, lung_path)
        if model_path is not None:
            cfg, model, diffusion = load_for_detection(model_path, torch.device("cpu"), seed=0)
        else:
            cfg = preset(random_preset or "small256")
            model, diffusion = build(cfg)
            model.eval()
        before = _rusage()
        result = detect_volume(ct_path, model, diffusion, cfg, lung_path=lung_path)
        spent = _since(before)
    evaluations = result.facts["network_evaluations"]
    out.update(model=model_note, slices=slices, size=size, lung_slices=int(result.processed.size),
               detect_s=spent["wall"], user_s=spent["user"], system_s=spent["system"], faults=spent["faults"],
               noise_s=result.facts["timings"]["noise_s"], evaluations=evaluations,
               peak_rss_mb=peak_host_memory_mb(),
               error_sha256=hashlib.sha256(np.ascontiguousarray(result.error).tobytes()).hexdigest())
    return out


def allocator_comparison(slices: int = 120, size: int = 256, train_presets=(), train_steps: int = 3,
                         random_preset: str = "") -> dict:
    """``volume_run`` in two child processes, glibc's default (SACDIFF_KEEP_FREED_MEMORY=0) and SACDiff's setting:
    the allocator is process-wide and cannot be switched back exactly, so each side gets a fresh process."""
    import json
    import os
    import subprocess

    from ..allocator import ENV_SWITCH

    runs = {}
    for label, switch in (("glibc_default", "0"), ("keep_freed_memory", "1")):
        code = ("import json, sys\nfrom SACDiffLib.experiments.benchmark import volume_run\n"
                f"print('RESULT', json.dumps(volume_run({slices}, {size}, {tuple(train_presets)!r}, {train_steps}, "
                f"{random_preset!r})))")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={**os.environ, ENV_SWITCH: switch})
        if done.returncode != 0:
            raise RuntimeError(f"benchmark child ({label}) failed:\n{done.stderr[-2000:]}")
        runs[label] = json.loads(done.stdout.split("RESULT", 1)[1])
    off, on = runs["glibc_default"], runs["keep_freed_memory"]
    runs["speedup"] = off["detect_s"] / on["detect_s"]
    runs["identical_outputs"] = off["error_sha256"] == on["error_sha256"]
    return runs


def allocator_lines(a: dict) -> list[str]:
    """The comparison as printed: each figure glibc's default → SACDiff's setting, with the ratio."""
    off, on = a["glibc_default"], a["keep_freed_memory"]

    def cpu(r):
        total = r["user_s"] + r["system_s"]
        return (f"{r['detect_s']:.0f} s (system {r['system_s'] / total:.0%} of {total:.0f} s CPU, "
                f"{r['faults'] / max(r['evaluations'], 1):.0f} page faults per UNet evaluation, "
                f"noise {r['noise_s'] / r['detect_s']:.1%}"
                + (f", peak resident memory {r['peak_rss_mb']:.0f} MB" if "peak_rss_mb" in r else "") + ")")

    lines = [f"whole-volume detection, {on['size']}²×{on['slices']} phantom ({on['lung_slices']} lung slices, "
             f"{on['evaluations']} UNet evaluations, {on['model']}, its default settings): glibc default {cpu(off)}; "
             f"freed memory kept {cpu(on)} → {a['speedup']:.2f}× faster; anomaly maps byte-identical: "
             f"{'yes' if a['identical_outputs'] else 'NO'}"]
    if not on["keep_freed_memory"]:
        lines.append("(the allocator setting does not apply on this system: both runs used the default)")
    for name, tr_on in on["training"].items():
        tr_off = off["training"][name]
        lines.append(f"training, preset {name}: {tr_off['samples_per_s']:.1f} → {tr_on['samples_per_s']:.1f} "
                     f"samples/s ({tr_on['samples_per_s'] / tr_off['samples_per_s']:.2f}×); system CPU "
                     f"{tr_off['system_share']:.0%} → {tr_on['system_share']:.0%}")
    return lines


def run_benchmark(device: str = "auto", quick: bool = False) -> dict:
    dev = str(resolve_device(device))
    results = {"threads": torch.get_num_threads()}
    n = bench_noise(64 if quick else 128, 4 if quick else 8, "cpu", 3)
    results["noise_cpu"] = n
    log.info(f"noise, one {n['size']}² single-octave field on CPU: opensimplex "
             f"{n['opensimplex_s_per_field'] * 1e3:.1f} ms, torch {n['torch_s_per_field'] * 1e3:.2f} ms → "
             f"{n['speedup']:.0f}× ; "
             f"6-octave fields: {n['torch_6_octave_fields_per_s']:.0f}/s")
    rows = bench_noise_octaves((64,) if quick else (128, 256, 512), "cpu", 2 if quick else 4)
    results["noise_octaves_cpu"] = rows
    for r in rows:
        ref = (f"; opensimplex {r['opensimplex_ms']:.0f} ms → eager {r['eager_vs_opensimplex']:.0f}×, compiled "
               f"{r['compiled_vs_opensimplex']:.0f}×") if "opensimplex_ms" in r else ""
        log.info(f"6-octave field {r['size']}² on CPU: eager {r['eager_ms']:.1f} ms, torch.compile "
                 f"{r['compiled_ms']:.1f} ms ({r['compiled_speedup']:.1f}× faster; compiled once in "
                 f"{r['compile_s']:.0f} s){ref}")
    if dev.startswith("cuda"):
        results["noise_octaves_cuda"] = bench_noise_octaves((128, 256, 512), dev, 64, reference=False)
        g = bench_noise(512, 64, dev, 5)
        results["noise_cuda"] = g
        log.info(f"noise on {dev}: 512² field {g['torch_s_per_field'] * 1e6:.0f} µs; "
                 f"6-octave fields {g['torch_6_octave_fields_per_s']:.0f}/s")
    for name in (("tiny",) if quick else ("demo", "small", "small256", "fast")):
        tr = bench_training(name, dev, 2 if quick else 3, compile_noise=not quick)
        results[f"train_{name}"] = tr
        log.info(f"training, preset {name} ({tr['image_size']}², batch {tr['batch']}) on {tr['device']}: "
                 f"{tr['samples_per_s']:.1f} samples/s; data {tr['share']['data']:.0%}, "
                 f"noise {tr['share']['noise']:.0%}, network {tr['share']['network']:.0%}")
    for name in (("tiny",) if quick else ("demo", "fast")):
        d = bench_detection_step(name, 4 if quick else 8, dev, 3)
        results[f"step_{name}"] = d
        flops = unet_flops(preset(name))
        d["gflops_per_evaluation"] = flops / 1e9
        log.info(f"detection step, preset {name} ({d['image_size']}², K={d['ensemble']} × {d['slices']} slices) on "
                 f"{d['device']}: {d['s_per_step'] * 1e3:.1f} ms = {d['evaluations_per_s']:.0f} UNet evaluations/s, "
                 f"{flops / 1e9:.2f} GFLOP per evaluation → {flops * d['evaluations_per_s'] / 1e12:.3f} TFLOP/s")
    p = bench_precision("tiny" if quick else "small256-context", 2 if quick else 8, 32 if quick else 208, dev,
                        2 if quick else 3)
    results["precision"] = p
    log.info(f"network forward, preset {p['preset']}, {p['slices']} × {p['shape'][0]} × {p['shape'][1]} on "
             f"{p['device']} (AMX: {'yes' if p['amx'] else 'no'}): float32 {p['fp32_s'] * 1e3:.0f} ms, bf16 "
             f"{p['bf16_s'] * 1e3:.0f} ms → {p['speedup']:.2f}×; max |Δε̂| {p['max_abs_eps_difference']:.3f}")
    if dev.startswith("cuda"):
        peak = matmul_peak_tflops(dev)
        results["bf16_matmul_peak_tflops"] = peak
        d = bench_detection_step("paper", 8, dev, 3)
        flops = unet_flops(preset("paper"), dev)
        achieved = flops * d["evaluations_per_s"] / 1e12
        results["step_paper"] = dict(d, gflops_per_evaluation=flops / 1e9, achieved_tflops=achieved)
        evals = network_evaluations(preset("paper").detect) * 80  # 550 × 7 per slice, from the preset
        log.info(f"paper preset 512² on {dev}: {d['evaluations_per_s']:.0f} evaluations/s, {achieved:.1f} TFLOP/s = "
                 f"{achieved / peak:.2f} of the measured bf16 matmul peak {peak:.0f} TFLOP/s; a 80-slice volume "
                 f"(550 × 7 × 80 evaluations) ≈ {evals / d['evaluations_per_s']:.0f} s, FLOP floor "
                 f"{evals * flops / (peak * 1e12):.0f} s")
    name = "tiny" if quick else "small"
    v = bench_volume(name, 4 if quick else 8, 3 if quick else 5, dev, naive=True)
    results["volume"] = v
    log.info(f"reconstruction, preset {name}, {v['slices']} slices × K={v['ensemble']} × {v['steps']} steps on "
             f"{v['device']}: batched + lung crop ({v['box_fraction']:.0%} of the grid) {v['batched_s']:.2f} s "
             f"vs naive loop with opensimplex noise {v['naive_s']:.2f} s → {v['speedup']:.1f}×")
    r = bench_rethreshold((24, 256, 256) if quick else (80, 512, 512), 3 if quick else 5)
    results["rethreshold"] = r
    log.info(f"λ re-threshold of {'×'.join(map(str, r['shape'][::-1]))}: {r['rethreshold_s'] * 1e3:.0f} ms "
             f"(target ≤ 100) vs whole-volume path {r['whole_volume_s'] * 1e3:.0f} ms → {r['speedup']:.1f}×")
    a = allocator_comparison(8 if quick else 120, 64 if quick else 256,
                             ("tiny",) if quick else ("demo", "small", "small256", "fast"), 2 if quick else 3,
                             "tiny" if quick else "")
    results["allocator"] = a
    for line in allocator_lines(a):
        log.info(line)
    results["peak_host_memory_mb"] = peak_host_memory_mb()
    line = f"peak memory: host {results['peak_host_memory_mb']:.0f} MB"
    if dev.startswith("cuda"):
        results["peak_cuda_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
        line += f", device {results['peak_cuda_memory_mb']:.0f} MB"
    log.info(line)
    return results
