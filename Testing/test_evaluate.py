"""`sacdiff evaluate` end to end on a tiny phantom folder; metrics re-derived by hand from the written masks."""

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk

from SACDiffLib.cli import main
from SACDiffLib.experiments.phantom import write_phantom_cases


def test_evaluate_tiny_phantom_folder(tmp_path, tiny_checkpoint, capsys):
    cases = write_phantom_cases(tmp_path / "cases", cases=2, kind="covid", size=48, slices=10, seed=3, normals=1)
    out = tmp_path / "results"
    assert main(["evaluate", "--cases", str(cases), "--model", str(tiny_checkpoint), "--out", str(out),
                 "--steps", "3", "--no-crf", "--lambda", "0"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= {"cases", "medseg_covid", "mean"}
    assert sorted(summary["cases"]) == ["phantom_covid_000", "phantom_covid_001", "phantom_normal_000"]
    assert set(summary["mean"]) == {"iou", "dice", "precision", "recall", "fpr", "slice_auroc", "baseline_dice",
                                    "voxel_auroc", "oracle_dice"}
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
    n_truth = np.sum(truth & lung)  # baseline: the whole lung flagged
    assert summary["cases"][name]["baseline_dice"] == pytest.approx(2 * n_truth / (lung.sum() + n_truth))
    error = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "runs" / name / "anomaly_map.nii.gz")))
    from SACDiffLib.metrics import auroc, oracle_dice
    assert summary["cases"][name]["voxel_auroc"] == pytest.approx(auroc(error[lung], truth[lung]), abs=1e-6)
    assert summary["cases"][name]["oracle_dice"] == pytest.approx(oracle_dice(error[lung], truth[lung])[0], abs=1e-3)
    dices = [summary["cases"][c]["dice"] for c in ("phantom_covid_000", "phantom_covid_001")]
    assert summary["mean"]["dice"] == pytest.approx(np.mean(dices))
    rows = list(csv.DictReader(open(out / "cases.csv")))
    assert [r["case"] for r in rows] == sorted(summary["cases"])
    assert "mean (std)" in (out / "summary.md").read_text()
    assert main(["evaluate", "--cases", str(cases), "--model", str(tiny_checkpoint), "--out", str(out)]) == 2


def test_evaluate_scores_medseg_slices_per_slice(tmp_path, tiny_checkpoint):
    """MedSeg-like 8-bit slices cropped to the chest (lungs touch the border): the fallback lung mask copes, and
    the summary's mean (std) equals the per-slice rows."""
    from PIL import Image

    from SACDiffLib.experiments.phantom import chest_phantom

    cases = write_phantom_cases(tmp_path / "cases", cases=1, kind="covid", size=48, slices=8, seed=5)
    medseg = cases / "slices" / "medseg_covid"
    (medseg / "image").mkdir(parents=True)
    (medseg / "mask").mkdir()
    for n, seed in enumerate((1, 2)):
        hu, lungs, lesion, _ = chest_phantom(96, 12, "covid", seed)
        z = int(np.argmax(lesion.sum(axis=(1, 2))))
        ys, xs = np.nonzero(lungs[z])
        crop = (slice(ys.min() + 1, None), slice(None))  # cropped at the lung apex: the lungs touch the border
        grey = np.clip((hu[z][crop].astype(np.float32) + 1350) / 1500 * 255, 0, 255).round().astype(np.uint8)
        # stored as MedSeg stores them: the transpose of the axial view
        Image.fromarray(np.ascontiguousarray(grey.T)).save(medseg / "image" / f"{n}.jpg", quality=95)
        Image.fromarray(np.ascontiguousarray((lesion[z][crop] > 0).astype(np.uint8).T)).save(medseg / "mask" / f"{n}.png")
    out = tmp_path / "results"
    assert main(["evaluate", "--cases", str(cases), "--model", str(tiny_checkpoint), "--out", str(out),
                 "--steps", "3", "--no-crf"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = [r for r in csv.DictReader(open(out / "medseg_covid.csv")) if r["status"] == "ok"]
    assert len(rows) == 2 and all(float(r["lung_fraction"]) > 0.2 for r in rows)
    for metric in ("iou", "dice", "precision", "recall", "fpr", "baseline_dice"):
        values = [float(r[metric]) for r in rows]
        assert summary["medseg_covid"]["mean"][metric]["mean"] == pytest.approx(np.mean(values), abs=1e-4)
        assert summary["medseg_covid"]["mean"][metric]["std"] == pytest.approx(np.std(values), abs=1e-4)
    m = summary["medseg_covid"]
    assert 0 <= m["voxel_auroc"] <= 1 and m["pooled"]["dice"] <= m["oracle_dice"] + 1e-9
    assert 0 <= m["baseline_pooled_dice"] <= 1
    assert "MedSeg" in (out / "summary.md").read_text()


def test_sweep_reports_accuracy_against_network_evaluations(tmp_path, tiny_checkpoint, capsys):
    cases = write_phantom_cases(tmp_path / "cases", cases=1, kind="covid", size=48, slices=8, seed=4)
    out = tmp_path / "sweep"
    assert main(["evaluate", "--cases", str(cases), "--model", str(tiny_checkpoint), "--out", str(out),
                 "--sweep", "1x2,2x0", "--no-crf"]) == 0
    rows = json.loads((out / "sweep.json").read_text())
    assert [(r["ensemble"], r["evaluations_per_slice"]) for r in rows] == [(1, 2), (2, 20)]  # tiny: T_s = 10
    for r, name in zip(rows, ("1x2", "2x0")):
        summary = json.loads((out / name / "summary.json").read_text())
        assert r["mean_std"]["dice"]["mean"] == pytest.approx(summary["mean"]["dice"])
    assert main(["evaluate", "--cases", str(cases), "--model", str(tiny_checkpoint), "--out", str(tmp_path / "x"),
                 "--sweep", "3by25"]) == 2
    assert "is not K×n" in capsys.readouterr().err
