"""MedSeg detection with the classical vs the learned lung mask (Resources/results/lungmask.md), scored against the
FULL truth: the region is the mask ∪ the truth, so infection outside a mask counts as missed (prediction 0, error 0
there). Run from the repository root beside ../shared/data:  python Resources/results/medseg_effect.py LUNG.pt OUT.json"""
import json, sys, tempfile, time, torch, numpy as np, SimpleITK as sitk
from pathlib import Path
from SACDiffLib import allocator; allocator.keep_freed_memory()
from SACDiffLib.checkpoint import load_for_detection
from SACDiffLib.detect import detect_volume
from SACDiffLib.experiments import medseg
from SACDiffLib.lung import segment_lungs
from SACDiffLib.lungnet import learned_lungs
from SACDiffLib.metrics import auroc, oracle_dice, segmentation_metrics
cfg, model, diffusion = load_for_detection(None, torch.device("cpu"), seed=0)
folder = Path("../shared/data/slices/medseg_covid")
work = Path(tempfile.mkdtemp(prefix="sacdiff-medseg-effect-"))
out = {}
for method in ("classical", "learned"):
    t0 = time.time(); P, T, E, L, fails = [], [], [], [], []
    for path in medseg.list_slices(folder):
        hu, truth, _ = medseg.read_slice(path, folder / "mask" / f"{path.stem}.png")
        image = sitk.GetImageFromArray(hu); image.SetSpacing(medseg.SPACING_MM)
        ct_path, lung_path = work / f"{path.stem}_ct.nii.gz", work / f"{path.stem}_{method}_lung.nii.gz"
        sitk.WriteImage(image, str(ct_path))
        try:
            lung = learned_lungs(hu, image, sys.argv[1]) if method == "learned" else segment_lungs(hu, image, cropped=True)
            li = sitk.GetImageFromArray(lung); li.CopyInformation(image); sitk.WriteImage(li, str(lung_path))
            r = detect_volume(ct_path, model, diffusion, cfg, lung_path, torch.device("cpu"))
            pred, err, lung = r.mask > 0, r.error, r.lung > 0
        except Exception:
            fails.append(path.stem); pred = np.zeros(truth.shape, bool); err = np.zeros(truth.shape, np.float32); lung = pred.copy()
        region = lung | truth
        P.append(pred[region] & lung[region]); T.append(truth[region]); E.append(np.where(lung, err, 0)[region]); L.append(lung[region])
    p, t, e, l = map(np.concatenate, (P, T, E, L))
    m = segmentation_metrics(p, t)
    out[method] = {"pooled_dice": m["dice"], "whole_mask_baseline_dice": segmentation_metrics(l, t)["dice"],
                   "voxel_auroc": auroc(e, t), "oracle_dice": oracle_dice(e, t)[0],
                   "truth_inside_mask": float((t & l).sum() / t.sum()), "failed": fails, "seconds": time.time() - t0}
    print(method, out[method], flush=True)
json.dump(out, open(sys.argv[2], "w"), indent=1)
