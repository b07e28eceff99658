"""Experiment (map-candidates.md, round 27): does α hold when disease fills much of the lung? No lesion label is read.

    python Resources/results/diffuse_extent.py ../shared/data OUT.json [--model M.pt] [--fraction 0.4] [--seed 2]
                                               [--lambdas 8,16,24]

Each held-out healthy volume of ``sacdiff validate`` (same slabs as ``alpha_reference.py``) is detected twice: as it
is, and with synthetic ground glass (``validate.LESION_KINDS``' ground glass: pulled towards −450 HU with weight 0.75,
so vessels show through) over ``--fraction`` of the lung of every slice — a smooth random field (≈ 10 mm in-plane,
one slice along z) thresholded at its quantile inside each slice's lung, what diffuse COVID-19 does. For each α
region of ``alpha_reference.py`` (body, 5 mm shell, the lung) and each λ: α with the ground glass ÷ α without, and
the share of the ground glass flagged (recall, on the processed slices). A region whose α rises with the disease
lets extensive disease hide itself; a region outside the lung (Section 2.4's design) should not move.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from SACDiffLib.atomic import Output, write_json
from SACDiffLib.checkpoint import load_checkpoint, shipped_model_path
from SACDiffLib.detect import detect_volume
from SACDiffLib.experiments.validate import LESION_KINDS, model_holdout_volumes
from SACDiffLib.postprocess import rethreshold

FIELD_MM = 10.0  # in-plane smoothness of the ground glass's random field


def diffuse_ground_glass(hu: np.ndarray, lung: np.ndarray, spacing_zyx, fraction: float,
                         rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(HU with ground glass, its mask) for a (z, y, x) volume: on every slice with lung, the ``fraction`` of its lung
    where a smooth random field is highest, pulled towards the ground glass's target HU with its blend weight (edges
    softened by one pixel, as ``validate.synthetic_lesions`` draws a patch)."""
    _, target, _, blend = next(k for k in LESION_KINDS if k[0] == "ground-glass")
    sigma = (1.0,) + tuple(FIELD_MM / s for s in spacing_zyx[1:])
    field = ndimage.gaussian_filter(rng.normal(size=hu.shape), sigma)
    inside = lung > 0
    region = np.zeros(hu.shape, bool)
    for z in np.nonzero(inside.any(axis=(1, 2)))[0]:
        region[z] = inside[z] & (field[z] >= np.quantile(field[z][inside[z]], 1.0 - fraction))
    weight = np.stack([ndimage.gaussian_filter(plane.astype(np.float32), 1.0) for plane in region]) * blend * inside
    out = hu.astype(np.float32) + weight * (target - hu.astype(np.float32))
    return np.round(out).astype(hu.dtype), region


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data")
    p.add_argument("out", help="a new JSON file")
    p.add_argument("--model", help="a SACDiff checkpoint (default: the shipped model)")
    p.add_argument("--fraction", type=float, default=0.4, help="share of each slice's lung under ground glass")
    p.add_argument("--lambdas", default="8,16,24", help="λ values at which α and the recall are read")
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--overwrite", action="store_true", help="replace a JSON this script wrote")
    args = p.parse_args(argv)
    from alpha_reference import NORMAL_CASES, REGIONS, referenced  # the sibling script (its folder is on sys.path)

    if not 0.0 < args.fraction < 1.0:  # NaN too
        p.error(f"--fraction {args.fraction} must lie strictly between 0 and 1")
    lambdas = [float(v) for v in args.lambdas.split(",")]
    output = Output(args.out, "json", args.overwrite, inputs=[args.data, args.model])
    model_path = args.model or shipped_model_path()
    cfg, model, diffusion, _ = load_checkpoint(model_path, "cpu", noise_seed=args.seed)
    rng = np.random.default_rng(args.seed + 7)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="sacdiff-diffuse-") as tmp:
        volumes = model_holdout_volumes(args.data, cfg, Path(tmp), normal_cases=NORMAL_CASES, seed=args.seed)
        for vol in volumes:
            image = sitk.ReadImage(str(vol["ct"]))
            hu = sitk.GetArrayFromImage(image)
            lung = sitk.GetArrayFromImage(sitk.ReadImage(str(vol["lung"])))
            diseased, region = diffuse_ground_glass(hu, lung, image.GetSpacing()[::-1], args.fraction, rng)
            diseased_image = sitk.GetImageFromArray(diseased)
            diseased_image.CopyInformation(image)
            diseased_path = Path(tmp) / f"{vol['case']}-diffuse.nii.gz"
            sitk.WriteImage(diseased_image, str(diseased_path))
            clean = detect_volume(vol["ct"], model, diffusion, cfg, vol["lung"], "cpu")
            sick = detect_volume(diseased_path, model, diffusion, cfg, vol["lung"], "cpu")
            truth = np.zeros(region.shape, bool)
            truth[sick.processed] = region[sick.processed]
            lung_voxels = max(int((sick.lung[sick.processed] > 0).sum()), 1)
            row = {"ground_glass_percent_of_lung": float(100 * truth.sum() / lung_voxels)}
            for name in REGIONS:
                referenced(clean, name)
                referenced(sick, name)
                per_lambda = {}
                for lam in lambdas:
                    a_clean = clean.threshold.background_location + lam * clean.threshold.background_scale
                    rethreshold(sick, lam)
                    per_lambda[str(lam)] = {"alpha_clean": a_clean, "alpha_diffuse": sick.threshold.alpha,
                                            "alpha_ratio": sick.threshold.alpha / a_clean,
                                            "recall": float((sick.mask.astype(bool) & truth).sum() / truth.sum())}
                row[name] = per_lambda
            rows[vol["case"]] = row
            print(json.dumps({vol["case"]: {r: {lam: {k: round(v, 3) for k, v in x.items()}
                                                for lam, x in row[r].items()} for r in REGIONS}}), flush=True)
    with output as tmp_json:
        write_json(tmp_json, {"model": str(model_path), "fraction": args.fraction, "seed": args.seed, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
