"""Why the nsclc_lung1 tumour is missed: E at the tumour beside E at the other soft-tissue-density voxels inside the
lung (vessels, bronchial walls) and at aerated lung. Diagnostic only: nothing is chosen from it. Usage (from the
repository root, inside .venv):

    python Resources/results/nsclc_error_by_density.py RUN DATA_DIR

where RUN is the `sacdiff evaluate` run folder of nsclc_lung1 (RESULTS/runs/nsclc_lung1)."""

import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

DENSE_HU = -300.0  # soft-tissue density: the solid tumour, vessels, bronchial walls


def read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def main(run, data_dir):
    run, data_dir = Path(run), Path(data_dir)
    error = read(run / "anomaly_map.nii.gz")
    lung = read(run / "lung_mask.nii.gz") > 0
    tumour = read(data_dir / "ct" / "nsclc_lung1_lesion.nii.gz") > 0
    hu = read(data_dir / "ct" / "nsclc_lung1_ct.nii.gz")
    classes = {"tumour, solid part (> -300 HU)": tumour & lung & (hu > DENSE_HU),
               "other lung voxels > -300 HU (vessels, bronchial walls)": lung & ~tumour & (hu > DENSE_HU),
               "aerated lung (<= -300 HU)": lung & ~tumour & (hu <= DENSE_HU)}
    print("| voxels | count | E 25th | median | 75th | 95th percentile |\n|---|---|---|---|---|---|")
    for name, mask in classes.items():
        q = np.percentile(error[mask], [25, 50, 75, 95])
        print(f"| {name} | {int(mask.sum())} | " + " | ".join(f"{v:.4f}" for v in q) + " |")


if __name__ == "__main__":
    main(*sys.argv[1:3])
