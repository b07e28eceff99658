"""Experiment (map-candidates.md, round 8): a shallow and a deep map combined, scored by the label-free validation.

    python Resources/results/combined_depths.py ../shared/data OUT.json SHALLOW DEEP [--model M.pt] [--combine min|max-raw]
                                                  [--open-deep MM]

SHALLOW and DEEP are ``sacdiff validate --settings`` items (e.g. 100x10x3 and 250x10x3e2). Each held-out volume of
``sacdiff validate`` (same slabs, lesions and seed) is detected at both settings; each map is put in units of its
own background (E − loc) / scale, with loc and scale the robust statistics of E over the background region the
model's threshold uses (``postprocess.background_threshold``: the body outside the lung, or its 5 mm shell), and
the combined map is their voxel-wise maximum (round 8: the shallow map's diffuse disease or the deep map's solid
lesions, each above its own background) or, with ``--combine min``, their minimum (round 19: flagged only where
both depths see error — a vessel the deep chain invented is quiet at the shallow depth). ``--open-deep MM`` first
takes the deep map's grey-level opening by a ball of MM mm diameter (3D, in the scan's own spacing; round 22): error
survives only where such a ball fits inside it — a removed mass keeps its error, a removed vessel thinner than the
ball loses it. ``--combine max-raw`` takes the maximum of the two maps as they are — both are squared residuals of
the same windowed image, so they share a unit without any background's scale (round 23). The combined map is then
thresholded, CRF-refined and scored exactly as a setting of ``sacdiff validate`` (``score_setting``). It costs both
settings' network evaluations. No lesion label of a real case is read.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from SACDiffLib.atomic import Output, write_json
from SACDiffLib.checkpoint import load_for_detection
from SACDiffLib.config import derive
from SACDiffLib.detect import detect_volume
from SACDiffLib.experiments.validate import model_holdout_volumes, parse_settings, score_setting, worst_kind_oracle_dice
from SACDiffLib.postprocess import _body, background_threshold, opened


def in_background_units(result) -> np.ndarray:
    spacing_yx = tuple(result.reference.GetSpacing()[1::-1])
    t = background_threshold(result.error, result.lung, result.processed, 0.0, _body(result), result.box,
                             result.detect.background, spacing_yx)
    return (result.error - t.background_location) / max(t.background_scale, 1e-12)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data")
    p.add_argument("out", help="a new JSON file")
    p.add_argument("shallow", help="a `sacdiff validate --settings` item, e.g. 100x10x3")
    p.add_argument("deep", help="a `sacdiff validate --settings` item, e.g. 250x10x3e2")
    p.add_argument("--model", help="a SACDiff checkpoint (default: the shipped model)")
    p.add_argument("--combine", choices=("max", "min", "max-raw"), default="max",
                   help="voxel-wise maximum (round 8) or minimum (round 19) of the two maps in background units, or "
                        "the maximum of the maps as they are (round 23)")
    p.add_argument("--open-deep", type=float, default=0.0, metavar="MM",
                   help="grey-level opening of the deep map by a ball of MM mm diameter before combining (round 22)")
    p.add_argument("--overwrite", action="store_true", help="replace a JSON this script wrote")
    args = p.parse_args(argv)
    if not args.open_deep >= 0:  # NaN too
        p.error(f"--open-deep {args.open_deep} must be a diameter in mm ≥ 0 (0 = no opening)")
    data, model_path = args.data, args.model
    shallow, deep = (parse_settings(a)[0] for a in (args.shallow, args.deep))
    output = Output(args.out, "json", args.overwrite, inputs=[data, model_path])  # checked before the work
    cfg, model, diffusion = load_for_detection(model_path, "cpu")
    rows = {}
    with tempfile.TemporaryDirectory(prefix="sacdiff-combined-") as tmp:
        volumes = model_holdout_volumes(data, cfg, Path(tmp),
                                        normal_cases=["ctmd_normal001", "ctmd_normal002", "rt4dct"])
        pairs = []
        for vol in volumes:
            a = detect_volume(vol["ct"], model, diffusion, derive(cfg, detect=shallow), vol["lung"], "cpu")
            b = detect_volume(vol["ct"], model, diffusion, derive(cfg, detect=deep), vol["lung"], "cpu")
            if args.open_deep > 0:
                b.error = opened(b.error, args.open_deep, b.reference.GetSpacing()[::-1])
                b.threshold = None  # the opened map's own background statistics
            pairs.append((a, b, vol))
        for name, pick in (("shallow", 0), ("deep", 1), ("combined", 2)):
            results = []
            for a, b, vol in pairs:
                r = (a, b)[pick] if pick < 2 else a
                if pick == 2:
                    if args.combine == "max-raw":  # one unit already: squared residuals of the same image
                        r.error = np.maximum(a.error, b.error).astype(np.float32)
                    else:
                        combine = np.maximum if args.combine == "max" else np.minimum
                        r.error = combine(in_background_units(a), in_background_units(b)).astype(np.float32)
                    r.threshold = None  # score_setting then takes the background statistics of the new map
                results.append((r, vol))
            rows[name] = score_setting(results)
            row = rows[name]
            print(json.dumps({"map": name, "healthy_error": row["healthy_error"], "auroc": row["synthetic_voxel_auroc"],
                              "recommended_lambda": row["recommended_lambda"],
                              "worst_kind": worst_kind_oracle_dice(row),
                              "per_kind": {k: round(v["oracle_dice"], 3) for k, v in row["per_kind"].items()}}),
                  flush=True)
    with output as tmp_json:
        write_json(tmp_json, {"model": str(model_path), "shallow": shallow, "deep": deep, "combine": args.combine,
                              "open_deep_mm": args.open_deep, "rows": rows},
                   allow_nan=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
