"""nsclc_lung1, heart-level and tumour slices, old vs new reference model: CT | pseudo-healthy | error map E |
detected (red) vs tumour (green). Usage (from the repository root, inside .venv):

    python Resources/results/render_nsclc_slices.py OLD_RUN NEW_RUN DATA_DIR OUT.png

where OLD_RUN / NEW_RUN are `sacdiff evaluate` run folders of nsclc_lung1 (RESULTS/runs/nsclc_lung1)."""

import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image, ImageDraw


def read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def grey(hu, lo=-1350.0, hi=150.0):
    g = np.clip((hu - lo) / (hi - lo), 0, 1)
    return np.stack([g, g, g], -1)


def hot(v):
    v = np.clip(v, 0, 1)
    return np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], -1)


def main(old_run, new_run, data_dir, out):
    ct = read(Path(data_dir) / "ct" / "nsclc_lung1_ct.nii.gz").astype(np.float32)
    tumour = read(Path(data_dir) / "ct" / "nsclc_lung1_lesion.nii.gz") > 0
    z_tumour = int(np.argmax(tumour.reshape(tumour.shape[0], -1).sum(1)))
    z_heart = 8  # slices 4-11: the heart level where the old model invented a soft-tissue blob
    rows, labels = [], []
    for name, run in (("old model (128 grid)", Path(old_run)), ("new model (256 grid)", Path(new_run))):
        pseudo, error, mask = read(run / "pseudo_healthy.nii.gz"), read(run / "anomaly_map.nii.gz"), read(
            run / "anomaly_mask.nii.gz") > 0
        lung = read(run / "lung_mask.nii.gz") > 0
        emax = float(np.percentile(error[lung], 99.5)) or 1.0
        for z in (z_heart, z_tumour):
            det = grey(ct[z]).copy()
            det[mask[z]] = 0.5 * det[mask[z]] + 0.5 * np.array([1, 0, 0])
            det[tumour[z]] = 0.6 * det[tumour[z]] + 0.4 * np.array([0, 1, 0])
            rows.append(np.concatenate([grey(ct[z]), grey(pseudo[z]), hot(error[z] / emax), det], 1))
            labels.append(f"{name}, slice {z}")
    grid = (np.concatenate(rows, 0) * 255).astype(np.uint8)
    image = Image.fromarray(grid).resize((grid.shape[1] // 2, grid.shape[0] // 2), Image.BILINEAR)
    draw = ImageDraw.Draw(image)
    h = image.height // len(rows)
    for i, label in enumerate(labels):
        draw.text((4, i * h + 4), label + "   CT | pseudo-healthy | E | detected (red) / tumour (green)", fill="yellow")
    image.save(out)


if __name__ == "__main__":
    main(*sys.argv[1:5])
