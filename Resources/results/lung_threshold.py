"""Experiment (map-candidates.md, round 9): α referenced to the lung's own error instead of the body's.

    python Resources/results/lung_threshold.py ../shared/data OUT.json [--model=M.pt] SETTING

SETTING is a ``sacdiff validate --settings`` item. The held-out volumes of ``sacdiff validate`` (same slabs, lesions
and seed) are detected once; the map is scored twice as a validation setting (``score_setting``): with the
background-adaptive α of Section 2.4 (α = loc + λ·scale of E over the body outside the lung; this row must reproduce
the validation's), and with α = loc + λ·scale of E **inside the lung** on the processed slices (median and
1.4826·MAD, robust while lesions are a minority of the lung). No lesion label of a real case is read.
"""

import dataclasses
import json
import sys
import tempfile
from pathlib import Path

from SACDiffLib.checkpoint import load_for_detection
from SACDiffLib.config import derive
from SACDiffLib.detect import detect_volume
from SACDiffLib.experiments.validate import model_holdout_volumes, parse_settings, score_setting, worst_kind_oracle_dice
from SACDiffLib.postprocess import robust_location_scale


def lung_referenced(result) -> None:
    """Replace the cached background statistics by the lung's (``rethreshold`` then uses them for every λ)."""
    lung = result.lung[result.processed] > 0
    location, scale = robust_location_scale(result.error[result.processed][lung])
    result.threshold = dataclasses.replace(result.threshold, background_location=location, background_scale=scale)


def main(data: str, out: str, *args: str) -> None:
    model_path = None
    if args and args[0].startswith("--model="):
        model_path, args = args[0].split("=", 1)[1], args[1:]
    setting = parse_settings(args[0])[0]
    cfg, model, diffusion = load_for_detection(model_path, "cpu")
    rows = {}
    with tempfile.TemporaryDirectory(prefix="sacdiff-lung-threshold-") as tmp:
        volumes = model_holdout_volumes(data, cfg, Path(tmp),
                                        normal_cases=["ctmd_normal001", "ctmd_normal002", "rt4dct"])
        results = [(detect_volume(v["ct"], model, diffusion, derive(cfg, detect=setting), v["lung"], "cpu"), v)
                   for v in volumes]
        rows["body"] = score_setting(results)
        for r, _ in results:
            lung_referenced(r)  # score_setting left each threshold in place; only its statistics change
        rows["lung"] = score_setting(results)
    for name, row in rows.items():
        rec = row["recommended_lambda"]
        print(json.dumps({"alpha_from": name, "recommended_lambda": rec, "worst_kind": worst_kind_oracle_dice(row),
                          "per_case_at_12": {c: round(v["flagged_percent"]["12.0"], 2)
                                             for c, v in row["per_case"].items()},
                          "per_case_at_recommended": None if rec is None else {
                              c: round(v["flagged_percent"][str(rec)], 2) for c, v in row["per_case"].items()},
                          "dice_at_recommended": row.get("synthetic_dice_at_recommended")}), flush=True)
    Path(out).write_text(json.dumps({"model": str(model_path), "setting": setting, "rows": rows}, indent=1,
                                    allow_nan=False), encoding="utf-8")


if __name__ == "__main__":
    main(*sys.argv[1:])
