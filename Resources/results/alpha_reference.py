"""Experiment (map-candidates.md, round 14): from which region α is taken, on as-scanned and cropped images.

    python Resources/results/alpha_reference.py ../shared/data OUT.json [--model=M.pt] SETTING [VARIANT,...]

SETTING is a ``sacdiff validate --settings`` item; VARIANTs are ``sacdiff validate --variants`` items (default
``crop,8bit``). The held-out volumes of ``sacdiff validate`` (same slabs, lesions and seed 1) and their variants are
detected once each; every detection's map is then scored as a validation setting (``score_setting``) with α =
median + λ·1.4826·MAD of E over each candidate reference region, on the processed slices:

- ``body``:    the body outside the lung (Section 2.4, today's default; this row must reproduce the validation's);
- ``shell5``:  the body outside the lung within 5 mm (in-plane) of it — the chest wall, pleura and mediastinum next
               to the lung, which every chest image holds: a crop to the lungs' bounding box plus ≥ 5 mm keeps all
               of it, so this region is the same on as-scanned and cropped images;
- ``lung``:    the lung itself (round 9's row).

No lesion label of a real case is read.
"""

import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from scipy import ndimage

from SACDiffLib.checkpoint import load_checkpoint, shipped_model_path
from SACDiffLib.config import derive
from SACDiffLib.detect import detect_volume
from SACDiffLib.experiments.validate import (model_holdout_volumes, parse_settings, scanner_variant, score_setting,
                                             worst_kind_oracle_dice)
from SACDiffLib.postprocess import _body, robust_location_scale

SHELL_MM = 5.0
NORMAL_CASES = ["ctmd_normal001", "ctmd_normal002", "rt4dct"]


def reference_voxels(result, region: str) -> np.ndarray:
    """E over the candidate reference region on the processed slices (see the module docstring)."""
    lung = result.lung[result.processed] > 0
    error = result.error[result.processed]
    if region == "lung":
        return error[lung]
    outside = ~lung & _body(result)[result.processed]
    if region == "body":
        return error[outside]
    sx, sy = result.reference.GetSpacing()[:2]
    near = np.stack([ndimage.distance_transform_edt(~plane, sampling=(sy, sx)) <= SHELL_MM for plane in lung])
    return error[outside & near]


def referenced(result, region: str) -> None:
    """Replace the cached background statistics by the region's (``rethreshold`` then uses them for every λ)."""
    location, scale = robust_location_scale(reference_voxels(result, region))
    result.threshold = dataclasses.replace(result.threshold, background_location=location, background_scale=scale)


def summary(row: dict) -> dict:
    rec = row["recommended_lambda"]
    return {"recommended_lambda": rec, "worst_kind": worst_kind_oracle_dice(row),
            "alpha_at_24": {c: round(v["alpha"]["24.0"], 4) for c, v in row["per_case"].items()},
            "per_case_at_24": {c: round(v["flagged_percent"]["24.0"], 2) for c, v in row["per_case"].items()},
            "dice_at_24": row["synthetic_dice"]["24.0"],
            "per_case_at_recommended": None if rec is None else {
                c: round(v["flagged_percent"][str(rec)], 2) for c, v in row["per_case"].items()},
            "dice_at_recommended": row.get("synthetic_dice_at_recommended")}


def main(data: str, out: str, *args: str) -> None:
    model_path = None
    if args and args[0].startswith("--model="):
        model_path, args = args[0].split("=", 1)[1], args[1:]
    setting = parse_settings(args[0])[0]
    variants = (args[1] if len(args) > 1 else "crop,8bit").split(",")
    cfg, model, diffusion, _ = load_checkpoint(model_path or shipped_model_path(), "cpu", noise_seed=1)  # as validate --seed 1
    run_cfg = derive(cfg, detect=setting)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="sacdiff-alpha-reference-") as tmp:
        volumes = model_holdout_volumes(data, cfg, Path(tmp), normal_cases=NORMAL_CASES, seed=1)
        rng = np.random.default_rng(2)  # as ``validate_settings`` with seed 1
        for kind in [None] + variants:
            group = volumes if kind is None else [scanner_variant(v, kind, Path(tmp), rng) for v in volumes]
            results = [(detect_volume(v["ct"], model, diffusion, run_cfg, v["lung"], "cpu"), v) for v in group]
            for region in ("body", "shell5", "lung"):
                for r, _ in results:
                    r.threshold = dataclasses.replace(r.threshold, mode="adaptive")
                    referenced(r, region)  # score_setting re-thresholds from these statistics for every λ
                row = score_setting(results)
                rows[f"{kind or 'as scanned'} / {region}"] = row
                print(json.dumps({"variant": kind or "as scanned", "alpha_from": region, **summary(row)}), flush=True)
    Path(out).write_text(json.dumps({"model": str(model_path), "setting": setting, "rows": rows}, indent=1,
                                    allow_nan=False), encoding="utf-8")


if __name__ == "__main__":
    main(*sys.argv[1:])
