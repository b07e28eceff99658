"""``sacdiff calibrate``: λ chosen on a site's own healthy scans, written into a copy of the model.

A model's λ was chosen on the few healthy scans it was trained on; another scanner's noise and kernel move the
background error and with it the % of healthy lung that λ flags. Calibration detects once on each of the site's
healthy scans (their lung masks beside them, or the automatic one), then re-thresholds the cached maps over a grid
of λ (no further network runs) and picks the **smallest λ whose pooled flagged % of lung is ≤ the target**.

Scans that do not look healthy by SACDiff's own output are left out rather than calibrated on: at the chosen λ, a
scan whose largest connected flagged region is ≥ FOCAL_ML ml (healthy lung gives scattered specks, a lesion gives
a blob) or which alone flags more than OUTLIER_FACTOR × the target. They are named in the output and the
provenance; λ is then chosen again on the others. No lesion label is ever read.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Optional

import numpy as np
from scipy import ndimage

from .errors import SACDiffError
from .postprocess import rethreshold
from .progress import log

LAMBDAS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0, 12.0, 16.0, 20.0, 24.0, 32.0, 48.0, 64.0)
FOCAL_ML = 1.0
OUTLIER_FACTOR = 3.0


def flagged_table(results: dict, lambdas=LAMBDAS) -> dict:
    """Per scan and λ: (flagged lung voxels, lung voxels, largest connected flagged region in ml)."""
    table = {}
    for name, result in results.items():
        lung = result.lung > 0
        voxel_ml = float(np.prod(result.reference.GetSpacing())) / 1000.0
        rows = {}
        for lam in lambdas:
            rethreshold(result, lam)
            mask = (result.mask > 0) & lung
            labels, n = ndimage.label(mask)
            largest = int(np.bincount(labels.ravel())[1:].max()) if n else 0
            rows[lam] = (int(mask.sum()), int(lung.sum()), largest * voxel_ml)
        table[name] = rows
    return table


def choose_lambda(table: dict, target_percent: float, lambdas=LAMBDAS) -> tuple[Optional[float], dict]:
    """(smallest λ whose pooled flagged % ≤ target or None, {scan: reason} of the scans left out as not healthy-
    looking). Scans are left out at most once: λ is chosen, outliers are named, λ is chosen again without them."""

    def pooled_lambda(names):
        for lam in lambdas:
            flagged = sum(table[n][lam][0] for n in names)
            lung = sum(table[n][lam][1] for n in names)
            if lung and 100.0 * flagged / lung <= target_percent:
                return lam
        return None

    names = list(table)
    lam = pooled_lambda(names)
    probe = lambdas[-1] if lam is None else lam
    refused = {}
    for n in names:
        flagged, lung, largest = table[n][probe]
        percent = 100.0 * flagged / max(lung, 1)
        if largest >= FOCAL_ML:
            refused[n] = f"a connected flagged region of {largest:.1f} ml at λ {probe:g} (healthy lung gives specks)"
        elif percent > OUTLIER_FACTOR * target_percent:
            refused[n] = f"{percent:.2f} % of its lung flagged at λ {probe:g} (> {OUTLIER_FACTOR:g} × the target)"
    kept = [n for n in names if n not in refused]
    if refused and kept:
        lam = pooled_lambda(kept)
    return (lam if kept else None), refused


def calibrate(scans, model, diffusion, cfg, device, target_percent: float,
              lung_source=None, progress=None) -> dict:
    """Detect on every scan (``batch.Scan``), choose λ; returns the figures (see ``choose_lambda``)."""
    from .detect import detect_volume
    from .lung import LungSource
    from .progress import part

    results = {}
    for i, scan in enumerate(scans):
        log.info(f"[{i + 1}/{len(scans)}] {scan.name}")
        results[scan.name] = detect_volume(scan.ct, model, diffusion, cfg, scan.lung, device,
                                           part(progress, i, len(scans), scan.name),
                                           lung_source=lung_source or LungSource())
    table = flagged_table(results)
    lam, refused = choose_lambda(table, target_percent)
    kept = [n for n in table if n not in refused]
    if lam is None:
        why = "every scan was left out as not healthy-looking" if not kept else \
            f"no λ up to {LAMBDAS[-1]:g} flags ≤ {target_percent:g} % of their lung"
        raise SACDiffError(f"cannot calibrate: {why}" + (f" ({'; '.join(f'{k}: {v}' for k, v in refused.items())})"
                                                         if refused else "") + "; give healthy scans of this site")

    def percent(n, at):
        flagged, lung, _ = table[n][at]
        return round(100.0 * flagged / max(lung, 1), 4)

    pooled = sum(table[n][lam][0] for n in kept) / max(sum(table[n][lam][1] for n in kept), 1)
    return {"lambda": lam, "previous_lambda": cfg.detect.lam, "target_percent": target_percent,
            "pooled_flagged_percent": round(100.0 * pooled, 4),
            "per_scan_flagged_percent": {n: percent(n, lam) for n in kept},
            "per_scan_flagged_percent_at_previous": {n: percent(n, cfg.detect.lam) if cfg.detect.lam in LAMBDAS
                                                     else None for n in kept},
            "scans": [str(s.ct) for s in scans if s.name in kept], "left_out": refused,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "settings": {"steps": cfg.detect.steps, "sampling_steps": cfg.detect.sampling_steps,
                         "ensemble": cfg.detect.ensemble, "crf": cfg.detect.crf}}


def write_calibrated(model_path: Path, out: Path, figures: dict) -> Path:
    """A copy of the model with the calibrated λ as its default and the figures in its provenance."""
    from .checkpoint import read_checkpoint, slim_checkpoint

    payload = read_checkpoint(model_path)
    half = (payload.get("extra") or {}).get("stored_dtype") == "float16"
    return slim_checkpoint(model_path, out, half=half, detect={"lam": figures["lambda"]},
                           note={"calibration": figures})
