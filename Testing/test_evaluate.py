"""`sacdiff evaluate` end to end on a tiny phantom folder; metrics re-derived by hand from the written masks."""

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk

from SACDiffLib.cli import main
from SACDiffLib.phantom import write_phantom_cases


def test_evaluate_tiny_phantom_folder(tmp_path, tiny_checkpoint, capsys):
    cases = write_phantom_cases(tmp_path / "cases", cases=2, kind="covid", size=48, slices=10, seed=3, normals=1)
    out = tmp_path / "results"
    assert main(["evaluate", "--cases", str(cases), "--model", str(tiny_checkpoint), "--out", str(out),
                 "--steps", "3", "--no-crf", "--lambda", "0"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= {"cases", "medseg_covid", "mean"}
    assert sorted(summary["cases"]) == ["phantom_covid_000", "phantom_covid_001", "phantom_normal_000"]
    assert set(summary["mean"]) == {"iou", "dice", "precision", "recall", "fpr", "slice_auroc"}
    normal = summary["cases"]["phantom_normal_000"]
    assert "dice" not in normal and "anomaly_percent_of_lung" in normal  # no labels: volume only
    # Hand check of one case: counts from the written mask and the phantom's lesion, inside the lung.
    name = "phantom_covid_000"
    pred = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "runs" / name / "anomaly_mask.nii.gz"))) > 0
    lung = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "runs" / name / "lung_mask.nii.gz"))) > 0
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(cases / "ct" / f"{name}_lesion.nii.gz"))) > 0
    tp = np.sum(pred & truth & lung)
    fp = np.sum(pred & ~truth & lung)
    fn = np.sum(~pred & truth & lung)
    assert summary["cases"][name]["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    dices = [summary["cases"][c]["dice"] for c in ("phantom_covid_000", "phantom_covid_001")]
    assert summary["mean"]["dice"] == pytest.approx(np.mean(dices))
    rows = list(csv.DictReader(open(out / "cases.csv")))
    assert [r["case"] for r in rows] == sorted(summary["cases"])
    assert "mean (std)" in (out / "summary.md").read_text()
    assert main(["evaluate", "--cases", str(cases), "--model", str(tiny_checkpoint), "--out", str(out)]) == 2
