"""Diagnostic only (lesion labels; never used to choose a setting): the nsclc_lung1 tumour under detection settings.

    python Resources/results/nsclc_settings.py ../shared/data [--model=M.pt] '{}' '{"steps": 250, "harmonise_steps": 9}' ...

Each argument after the data folder (and the model, default the shipped one) is a JSON dict of detection settings
applied to the model's; one JSON
line per setting: tumour voxel AUROC and oracle Dice inside the lung, Dice of the mask at the model's λ beside the
whole-lung baseline, % of the lung flagged, α, seconds (map-candidates.md).
"""

import json
import sys
import time
from pathlib import Path

import SimpleITK as sitk

from SACDiffLib.checkpoint import load_for_detection
from SACDiffLib.config import derive
from SACDiffLib.detect import detect_volume
from SACDiffLib.metrics import auroc, oracle_dice, segmentation_metrics


def main(data: str, *settings: str) -> None:
    ct = Path(data) / "ct"
    model_path = None
    if settings and settings[0].startswith("--model="):
        model_path, settings = settings[0].split("=", 1)[1], settings[1:]
    cfg0, model, diffusion = load_for_detection(model_path, "cpu")
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(ct / "nsclc_lung1_lesion.nii.gz"))) > 0
    for text in settings or ("{}",):
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


if __name__ == "__main__":
    main(*sys.argv[1:])
