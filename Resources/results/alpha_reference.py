"""Experiment (map-candidates.md, round 14): from which region α is taken, on as-scanned and cropped images.

    python Resources/results/alpha_reference.py ../shared/data OUT.json SETTING [--model M.pt] [--variants crop,8bit]
                                                [--seed 1] [--skip-scanned] [--deep SETTING --open-deep MM]
    python Resources/results/alpha_reference.py --score OUT.json [MORE.json ...]

SETTING is a ``sacdiff validate --settings`` item; the variants are ``sacdiff validate --variants`` items. The
held-out volumes of ``sacdiff validate`` (same slabs, lesions and seed) and their variants are
detected once each; every detection's map is then scored as a validation setting (``score_setting``) with α =
median + λ·1.4826·MAD of E over each candidate reference region, on the processed slices:

- ``body``:    the body outside the lung (Section 2.4, today's default; this row must reproduce the validation's);
- ``shell5``:  the body outside the lung within 5 mm (in-plane) of it (``DetectConfig.background`` "lung-shell"):
               the chest wall, pleura and mediastinum next to the lung, which every chest image holds; a crop to the
               lungs' bounding box plus ≥ 5 mm keeps all of it, so this region is the same on as-scanned and cropped
               images;
- ``lung``:    the lung itself (round 9's experiment: ``--seed 0 --variants ''`` reproduces its two rows).

With ``--deep SETTING --open-deep MM`` (round 23's candidate, map-candidates.md) every volume is detected at the
deep setting too, its map opened by a ball of MM mm (``postprocess.opened``), and the map scored is the maximum of
the two maps as they are (``combined_depths --combine max-raw``) — detection's own ``DetectConfig.deep_*`` chain
(round 24), which shares the setting's K; it costs both settings' network evaluations.

No lesion label of a real case is read.

``--score`` applies round 15's rule (map-candidates.md) to the rows of one or more such files: per region, λ* = the
smallest λ of the grid keeping every held-out case of every group ≤ 1 % of its clean lung, and its score = the
lowest group's synthetic Dice at λ*; since round 28 only the regions fit for extensive disease (FIT_REGIONS: body,
shell) can win — the lung's row is printed, marked unfit. The groups can be detected in separate processes
(``--skip-scanned`` leaves the as-scanned group out; ``--variants ''`` keeps it alone) and scored together: the crop
and 8-bit variants draw nothing from the seed's generator, so a split run's rows are those of a single run.
"""

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from SACDiffLib.atomic import Output, write_json
from SACDiffLib.checkpoint import load_checkpoint, shipped_model_path
from SACDiffLib.config import derive
from SACDiffLib.detect import detect_volume
from SACDiffLib.errors import SACDiffError
from SACDiffLib.experiments.validate import (VARIANTS, model_holdout_volumes, parse_settings, scanner_variant,
                                             score_setting, worst_kind_oracle_dice)
from SACDiffLib.postprocess import _background, _body, robust_location_scale

REGIONS = ("body", "shell5", "lung")
NORMAL_CASES = ["ctmd_normal001", "ctmd_normal002", "rt4dct"]


def reference_voxels(result, region: str) -> np.ndarray:
    """E over the candidate reference region on the processed slices (see the module docstring)."""
    return _background(result.error, result.lung, result.processed, _body(result), result.box,
                       {"body": "body", "shell5": "lung-shell", "lung": "lung"}[region],
                       tuple(result.reference.GetSpacing()[1::-1]))


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


ONE_PERCENT = 1.0  # round 15: every held-out case of every group flags ≤ 1 % of its clean lung at λ*
# Round 28: only a region whose α holds when disease fills much of the lung may win (round 27,
# ``diffuse_extent.py``: α from the lung rose 3.7–5.2× under ground glass over 40 % of it, the body's ≤ 1.16×,
# the shell's ≤ 1.08×)
FIT_REGIONS = ("body", "shell5")


def rule_scores(rows: dict) -> dict:
    """Round 15's rule over ``rows`` ("<group> / <region>" → ``score_setting`` row): region → {λ*, score, per group:
    synthetic Dice, vessels flagged, per-case % and worst-kind oracle Dice at λ*}; λ* None when no λ of the grid
    keeps every case ≤ 1 %."""
    groups = sorted({key.split(" / ")[0] for key in rows}, key=lambda g: (g != "as scanned", g))
    scores = {}
    for region in REGIONS:
        region_rows = {g: rows[f"{g} / {region}"] for g in groups if f"{g} / {region}" in rows}
        if not region_rows:
            continue
        lambdas = sorted(next(iter(region_rows.values()))["synthetic_dice"], key=float)
        star = next((lam for lam in lambdas
                     if all(case["flagged_percent"][lam] <= ONE_PERCENT
                            for row in region_rows.values() for case in row["per_case"].values())), None)
        entry = {"lambda_star": None if star is None else float(star), "groups": list(region_rows)}
        if star is not None:
            entry["score"] = min(row["synthetic_dice"][star] for row in region_rows.values())
            entry["per_group"] = {g: {"synthetic_dice": row["synthetic_dice"][star],
                                      "vessel_flagged_percent": row["vessel_flagged_percent"][star],
                                      "per_case_percent": {c: v["flagged_percent"][star]
                                                           for c, v in row["per_case"].items()},
                                      # rows made before the figure existed lack it
                                      "worst_clean_slice_ml": {c: v["worst_clean_slice_ml"][star]
                                                               for c, v in row["per_case"].items()
                                                               if "worst_clean_slice_ml" in v},
                                      "healthy_error": row["healthy_error"],
                                      "worst_kind": worst_kind_oracle_dice(row)}
                                  for g, row in region_rows.items()}
        scores[region] = entry
    return scores


def score_files(paths: list) -> int:
    """``--score``: the rule over the union of the files' rows; files of different models, settings or seeds (not
    one run split in parts) and a group found in two files are refused."""
    if not paths:
        raise SystemExit("--score needs one or more JSON files this script wrote")
    rows, runs = {}, set()
    for path in paths:
        document = json.loads(Path(path).read_text())
        runs.add(json.dumps({k: document.get(k) for k in ("model", "setting", "seed", "deep", "open_deep_mm")},
                            sort_keys=True))
        twice = sorted(set(rows) & set(document["rows"]))
        if twice:
            raise SystemExit(f"{path}: rows {', '.join(twice)} are in an earlier file too; score each run once")
        rows.update(document["rows"])
    if len(runs) > 1:
        raise SystemExit(f"{', '.join(map(str, paths))} come from different models, settings or seeds; score one run")
    scores = rule_scores(rows)
    for region, entry in scores.items():
        unfit = "" if region in FIT_REGIONS else " — unfit to set α (round 28: it rises with extensive disease)"
        if entry["lambda_star"] is None:
            print(f"{region}: no λ of the grid keeps every case of {', '.join(entry['groups'])} ≤ 1 %{unfit}")
            continue
        print(f"{region}: λ* {entry['lambda_star']:g}, score {entry['score']:.3f} (lowest of {len(entry['groups'])} "
              f"groups' synthetic Dice){unfit}")
        for group, g in entry["per_group"].items():
            cases = ", ".join(f"{v:.2f}" for v in g["per_case_percent"].values())
            worst = (", worst clean slice " + ", ".join(f"{v:.2f}" for v in g["worst_clean_slice_ml"].values())
                     + " ml" if g["worst_clean_slice_ml"] else "")
            print(f"    {group}: Dice {g['synthetic_dice']:.3f}, vessels {g['vessel_flagged_percent']:.1f} %, "
                  f"per case {cases} %{worst}, healthy E {g['healthy_error']:.4f}, worst kind {g['worst_kind']:.3f}")
    print(f"best fit region: {best_fit_region(scores) or 'none (no fit region has a λ*)'}")
    return 0


def best_fit_region(scores: dict):
    """Round 28's winner among ``rule_scores``' regions: the fit region (FIT_REGIONS) with the highest score; None
    when no fit region has a λ*. (The tie rule — the shipped region keeps a tie within 0.01 — is the reader's: it
    compares two runs.)"""
    fit = {r: e["score"] for r, e in scores.items() if r in FIT_REGIONS and e["lambda_star"] is not None}
    return max(fit, key=fit.get) if fit else None


def deep_settings(deep, setting: dict, open_deep_mm: float) -> dict:
    """``--deep`` (a parsed settings item) as the detection's own deep chain (``DetectConfig.deep_*``), which shares
    the first chain's K and everything but T_s, the respaced steps and the error radius."""
    if deep is None:
        return {}
    other = sorted(set(deep) - {"steps", "sampling_steps", "ensemble", "error_radius"})
    if other or deep["ensemble"] != setting["ensemble"]:
        raise SACDiffError(f"--deep {deep}: the deep chain takes only T_s × steps × K[e<R>] with the setting's own K "
                           f"({setting['ensemble']}); drop {', '.join(other) or 'the other K'}")
    return {"deep_steps": deep["steps"], "deep_sampling_steps": deep["sampling_steps"],
            "deep_error_radius": deep.get("error_radius", 0), "deep_opening_mm": open_deep_mm}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--score"]:
        return score_files(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data")
    p.add_argument("out", help="a new JSON file")
    p.add_argument("setting", help="one `sacdiff validate --settings` item, e.g. 100x10x3")
    p.add_argument("--model", help="a SACDiff checkpoint (default: the shipped model)")
    p.add_argument("--variants", default="crop,8bit", help="`sacdiff validate --variants` items; '' for none")
    p.add_argument("--seed", type=int, default=1, help="as `sacdiff validate --seed` (lesions and noise fields)")
    p.add_argument("--skip-scanned", action="store_true",
                   help="leave the as-scanned group out (its variants' rows in a second process; see --score)")
    p.add_argument("--deep", help="a second, deep `sacdiff validate --settings` item whose opened map is combined with "
                                  "SETTING's by the maximum (round 23), e.g. 250x10x3e2")
    p.add_argument("--open-deep", type=float, default=0.0, metavar="MM",
                   help="with --deep: the grey-level opening of the deep map by a ball of MM mm diameter")
    p.add_argument("--overwrite", action="store_true", help="replace a JSON this script wrote")
    args = p.parse_args(argv)
    if not args.open_deep >= 0:  # NaN too
        p.error(f"--open-deep {args.open_deep} must be a diameter in mm ≥ 0 (0 = no opening)")
    if args.open_deep and not args.deep:
        p.error("--open-deep opens the --deep map: give --deep SETTING too")
    variants = [v for v in args.variants.split(",") if v]
    if args.skip_scanned and not variants:
        p.error("--skip-scanned with no --variants leaves nothing to detect")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        p.error(f"--variants {', '.join(unknown)} unknown; choose from {', '.join(VARIANTS)}")
    try:  # every refusal before the work, one line each
        setting = parse_settings(args.setting)[0]
        deep = parse_settings(args.deep)[0] if args.deep else None
        deep_settings(deep, setting, args.open_deep)
        output = Output(args.out, "json", args.overwrite, inputs=[args.data, args.model])
    except SACDiffError as exc:
        p.error(str(exc))
    model_path = args.model or shipped_model_path()
    cfg, model, diffusion, _ = load_checkpoint(model_path, "cpu", noise_seed=args.seed)  # as validate --seed
    run_cfg = derive(cfg, detect={**setting, **deep_settings(deep, setting, args.open_deep)})
    rows = {}
    with tempfile.TemporaryDirectory(prefix="sacdiff-alpha-reference-") as tmp:
        volumes = model_holdout_volumes(args.data, cfg, Path(tmp), normal_cases=NORMAL_CASES, seed=args.seed)
        context = (cfg.model.context_slices, cfg.model.context_mm)
        rng = np.random.default_rng(args.seed + 1)  # as ``validate_settings``
        for kind in ([] if args.skip_scanned else [None]) + variants:
            group = volumes if kind is None else [scanner_variant(v, kind, Path(tmp), rng, context) for v in volumes]
            results = [(detect_volume(v["ct"], model, diffusion, run_cfg, v["lung"], "cpu"), v) for v in group]
            for region in REGIONS:
                for r, _ in results:
                    referenced(r, region)  # score_setting re-thresholds from these statistics for every λ
                row = score_setting(results)
                rows[f"{kind or 'as scanned'} / {region}"] = row
                print(json.dumps({"variant": kind or "as scanned", "alpha_from": region, **summary(row)}), flush=True)
    with output as tmp_json:
        write_json(tmp_json, {"model": str(model_path), "setting": setting, "seed": args.seed, "deep": deep,
                              "open_deep_mm": args.open_deep if deep else None, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
