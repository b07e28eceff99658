"""Diagnostic only (lesion labels; never used to choose a setting): the nsclc_lung1 tumour under detection settings.

    python Resources/results/nsclc_settings.py ../shared/data [--model M.pt] '{}' '{"steps": 250, "harmonise_steps": 9}' ...

Each argument after the data folder (and the model, default the shipped one) is a JSON dict of detection settings
applied to the model's; one JSON
line per setting: tumour voxel AUROC and oracle Dice inside the lung, Dice of the mask at the model's λ beside the
whole-lung baseline, % of the lung flagged, α, seconds (map-candidates.md).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import SimpleITK as sitk

from SACDiffLib.checkpoint import load_for_detection
from SACDiffLib.config import derive
from SACDiffLib.detect import detect_volume
from SACDiffLib.metrics import auroc, oracle_dice, segmentation_metrics


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data")
    p.add_argument("settings", nargs="*", default=["{}"], help="JSON dicts of detection settings")
    p.add_argument("--model", help="a SACDiff checkpoint (default: the shipped model)")
    args = p.parse_intermixed_args(argv)  # the documented commands give --model before the settings
    ct = Path(args.data) / "ct"
    cfg0, model, diffusion = load_for_detection(args.model, "cpu")
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(ct / "nsclc_lung1_lesion.nii.gz"))) > 0
    for text in args.settings:
        setting = json.loads(text)
        t0 = time.time()
        r = detect_volume(ct / "nsclc_lung1_ct.nii.gz", model, diffusion, derive(cfg0, detect=setting),
                          ct / "nsclc_lung1_lung.nii.gz")
        lung = r.lung > 0
        e, t = r.error[lung], truth[lung]
        print(json.dumps({"setting": setting, "auroc": auroc(e, t), "oracle_dice": oracle_dice(e, t)[0],
                          "dice": segmentation_metrics(r.mask > 0, truth)["dice"],
                          "baseline_dice": segmentation_metrics(lung, truth)["dice"],  # flag the whole lung
                          "lung_flagged_percent": 100 * float((r.mask[lung] > 0).mean()),
                          "alpha": r.threshold.alpha, "s": round(time.time() - t0, 1)}), flush=True)


    return 0


if __name__ == "__main__":
    sys.exit(main())
