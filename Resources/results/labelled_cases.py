"""A data folder of the labelled cases only (slice labels or a lesion mask) and the MedSeg slices, as symlinks into
DATA: the folder `sacdiff evaluate` is run on for the results (the healthy training cases are left out).

    python Resources/results/labelled_cases.py DATA OUT
"""

import json
import os
import sys


def main(data: str, out: str) -> None:
    os.makedirs(f"{out}/ct", exist_ok=True)
    cases = json.load(open(f"{data}/cases.json"))
    keep = {k: v for k, v in cases.items()
            if "slice_label_infection" in v or os.path.exists(f"{data}/ct/{k}_lesion.nii.gz")}
    json.dump(keep, open(f"{out}/cases.json", "w"), indent=1)
    for k in keep:
        for s in ("ct", "lung", "lesion"):
            src, dst = f"{data}/ct/{k}_{s}.nii.gz", f"{out}/ct/{k}_{s}.nii.gz"
            if os.path.exists(src) and not os.path.lexists(dst):
                os.symlink(os.path.abspath(src), dst)
    if not os.path.lexists(f"{out}/slices"):
        os.symlink(os.path.abspath(f"{data}/slices"), f"{out}/slices")


if __name__ == "__main__":
    main(*sys.argv[1:3])
