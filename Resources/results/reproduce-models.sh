#!/usr/bin/env bash
# The reference models side by side (model-comparison.md): run from the repository root beside ../shared/data,
# inside ./.venv (`source .venv/bin/activate`). OLD is the first reference model (128², kept in git history:
# `git show 4985bfd:Resources/models/sacdiff-small.pt > sacdiff-small.pt`), NEW the shipped one.
set -euo pipefail
WORK="${WORK:-/tmp/sacdiff-models}"
DATA="${DATA:-../shared/data}"
OLD="${OLD:-sacdiff-small.pt}"
NEW="${NEW:-Resources/models/sacdiff-small256.pt}"
HEALTHY="ctmd_normal001,ctmd_normal002,rt4dct"
mkdir -p "$WORK/labelled/ct"

# The labelled cases only (ctmd_P001: slice labels; nsclc_lung1: tumour mask) and the 50 MedSeg slices.
python - "$DATA" "$WORK/labelled" <<'PY'
import json, os, sys
data, out = sys.argv[1], sys.argv[2]
cases = json.load(open(f"{data}/cases.json"))
keep = {k: v for k, v in cases.items() if "slice_label_infection" in v or os.path.exists(f"{data}/ct/{k}_lesion.nii.gz")}
json.dump(keep, open(f"{out}/cases.json", "w"), indent=1)
for k in keep:
    for s in ("ct", "lung", "lesion"):
        src, dst = f"{data}/ct/{k}_{s}.nii.gz", f"{out}/ct/{k}_{s}.nii.gz"
        if os.path.exists(src) and not os.path.lexists(dst):
            os.symlink(os.path.abspath(src), dst)
if not os.path.lexists(f"{out}/slices"):
    os.symlink(os.path.abspath(f"{data}/slices"), f"{out}/slices")
PY

# Each model at its own settings (old: T_s 250, 25 steps, K 3, λ 1; new: as `sacdiff validate` chose them).
sacdiff evaluate --cases "$WORK/labelled" --model "$OLD" --out "$WORK/eval-old" --overwrite --device cpu
sacdiff evaluate --cases "$WORK/labelled" --model "$NEW" --out "$WORK/eval-new" --overwrite --device cpu

# Label-free figures on the held-out healthy slabs (every 5th slab of 8 lung slices of the three healthy CTs; the
# old model was trained on all slices of ctmd_normal001/002, so its figures there are optimistic).
sacdiff validate --data "$DATA" --model "$OLD" --out "$WORK/val-old" --overwrite --holdout-every 5 \
  --normal-cases "$HEALTHY" --device cpu
sacdiff validate --data "$DATA" --model "$NEW" --out "$WORK/val-new" --overwrite --normal-cases "$HEALTHY" --device cpu

# The picture: nsclc_lung1 heart-level and tumour slices.
python Resources/results/render_nsclc_slices.py "$WORK/eval-old/runs/nsclc_lung1" "$WORK/eval-new/runs/nsclc_lung1" \
  "$DATA" Resources/results/nsclc-old-vs-new.png
cp "$WORK/eval-old/summary.md" Resources/results/eval-old-model.md
cp "$WORK/eval-new/summary.md" Resources/results/eval-new-model.md
cp "$WORK/val-old/validation.md" Resources/results/validation-old-model.md
cp "$WORK/val-new/validation.md" Resources/results/validation-new-model.md
