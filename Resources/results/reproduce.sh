#!/usr/bin/env bash
# Re-creates every table in Resources/results from a checkout beside ../shared/data (run from the repository root,
# inside ./.venv: `source .venv/bin/activate`). Heavy outputs (NIfTI runs) go to $WORK; the tables are copied here.
# Model: the first reference model sacdiff-small.pt (git show 4985bfd:Resources/models/sacdiff-small.pt) at its own settings (T_s 250, 25 respaced steps, K 3, λ 1); set MODEL to use another (the shipped one: Resources/models/sacdiff-small256.pt; see reproduce-models.sh).
set -euo pipefail
WORK="${WORK:-/tmp/sacdiff-results}"
DATA="${DATA:-../shared/data}"
HERE="Resources/results"
MODEL="${MODEL:-sacdiff-small.pt}"
[[ -f "$MODEL" ]] || git show 4985bfd:Resources/models/sacdiff-small.pt > "$MODEL"
mkdir -p "$WORK"

# 1. MODEL on the labelled real cases (ctmd_P001: slice labels; nsclc_lung1: tumour mask) and the 50
#    MedSeg COVID slices. (The normal cases are the training data and are left out.)
python Resources/results/labelled_cases.py "$DATA" "$WORK/labelled"
sacdiff evaluate --model "$MODEL" --cases "$WORK/labelled" --out "$WORK/shared" --overwrite --device cpu

# (1b, the MedSeg run under one fitted window, is gone: MedSeg slices are now transposed and fitted per image by
#  default; medseg-fitted-window.md is the historical table of that run.)

# 2. Synthetic phantoms with known lesions (never seen in training): COVID-like (λ 1) and ILD-like (λ −0.25).
sacdiff phantom --out "$WORK/phantom-covid" --cases 3 --kind covid --size 128 --slices 24 --seed 100 --overwrite
sacdiff phantom --out "$WORK/phantom-ild" --cases 3 --kind ild --size 128 --slices 24 --seed 200 --overwrite
sacdiff evaluate --model "$MODEL" --cases "$WORK/phantom-covid" --out "$WORK/eval-phantom-covid" --overwrite --device cpu
sacdiff evaluate --model "$MODEL" --cases "$WORK/phantom-ild" --out "$WORK/eval-phantom-ild" --overwrite --device cpu --lambda=-0.25

# 3. Accuracy against network evaluations (the fast-preset trade-off) on one COVID phantom, against every step.
sacdiff phantom --out "$WORK/phantom-sweep" --cases 1 --kind covid --size 128 --slices 24 --seed 300 --overwrite
sacdiff evaluate --model "$MODEL" --cases "$WORK/phantom-sweep" --out "$WORK/sweep-phantom" --overwrite --device cpu \
  --sweep 3x0,3x50,3x25,3x10,3x5,1x25

# 4. Speed (ratios from one run on this machine).
sacdiff benchmark --json "$WORK/benchmark.json" | tee "$WORK/benchmark.txt"

# Copy the tables.
cp "$WORK/shared/summary.md" "$HERE/shared-data.md"; cp "$WORK/shared/summary.json" "$HERE/shared-data.json"
cp "$WORK/shared/cases.csv" "$HERE/shared-data-cases.csv"; cp "$WORK/shared/medseg_covid.csv" "$HERE/medseg-covid.csv"
cp "$WORK/eval-phantom-covid/summary.md" "$HERE/phantom-covid.md"
cp "$WORK/eval-phantom-ild/summary.md" "$HERE/phantom-ild.md"
cp "$WORK/sweep-phantom/sweep.md" "$HERE/sweep-phantom.md"; cp "$WORK/sweep-phantom/sweep.json" "$HERE/sweep-phantom.json"
cp "$WORK/benchmark.txt" "$HERE/benchmark-cpu.txt"; cp "$WORK/benchmark.json" "$HERE/benchmark-cpu.json"
