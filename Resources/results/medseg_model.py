"""MedSeg COVID-19 slices with a given model (the classical lung mask, the model's own settings), as `sacdiff
evaluate` scores them (``evaluate_medseg``), without a CT case beside them. Run from the repository root beside
../shared/data:  python Resources/results/medseg_model.py MODEL.pt  (or - for the shipped model)"""
import json
import sys
import tempfile

from SACDiffLib.checkpoint import load_for_detection
from SACDiffLib.experiments.evaluate import evaluate_medseg

cfg, model, diffusion = load_for_detection(None if sys.argv[1] == "-" else sys.argv[1], "cpu")
with tempfile.TemporaryDirectory(prefix="sacdiff-medseg-") as tmp:
    summary = evaluate_medseg("../shared/data/slices/medseg_covid", model, diffusion, cfg, "cpu", tmp)
print(json.dumps({k: v for k, v in summary.items() if k != "per_slice"}))
