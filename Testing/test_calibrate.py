"""`sacdiff calibrate`: λ chosen on a site's healthy scans, checked by hand on tables and end to end."""

from __future__ import annotations

import json

import pytest
import SimpleITK as sitk
import torch

from SACDiffLib.calibrate import FOCAL_ML, choose_lambda
from SACDiffLib.cli import main

LAMBDAS = (0.0, 1.0, 2.0, 4.0)


def _table(flagged_by_lambda, lung=10_000, largest=0.1):
    return {lam: (f, lung, largest) for lam, f in zip(LAMBDAS, flagged_by_lambda)}


def test_the_smallest_lambda_whose_pooled_flagged_percent_meets_the_target():
    # pooled % at λ 0, 1, 2, 4: 5.0, 1.5, 0.9, 0.2 → λ 2 is the smallest with ≤ 1 %
    table = {"a": _table([600, 200, 100, 30]), "b": _table([400, 100, 80, 10])}
    lam, refused = choose_lambda(table, 1.0, LAMBDAS)
    assert lam == 2.0 and refused == {}
    assert choose_lambda(table, 0.1, LAMBDAS) == (None, {})  # no λ of the grid is enough


def test_a_scan_with_a_focal_blob_is_left_out_and_lambda_chosen_on_the_others():
    table = {"a": _table([600, 200, 90, 30]), "b": _table([400, 100, 80, 10]),
             "sick": {lam: (f, 10_000, FOCAL_ML + 2.0) for lam, f in zip(LAMBDAS, [900, 700, 500, 400])}}
    lam, refused = choose_lambda(table, 1.0, LAMBDAS)
    assert list(refused) == ["sick"] and "connected flagged region" in refused["sick"]
    assert lam == 2.0  # a: 0.9 %, b: 0.8 % at λ 2; 1.5 % pooled at λ 1


def test_calibrate_writes_a_model_with_the_chosen_lambda_and_its_provenance(tmp_path, data_dir, tiny_checkpoint,
                                                                          capsys):
    scans = tmp_path / "site"
    scans.mkdir()
    for name in ("normal_a", "normal_b"):
        for kind in ("ct", "lung"):
            (scans / f"{name}_{kind}.nii.gz").write_bytes((data_dir / "ct" / f"{name}_{kind}.nii.gz").read_bytes())
    out = tmp_path / "site.pt"
    assert main(["calibrate", "--model", str(tiny_checkpoint), "--scans", str(scans), "--target", "2%",
                 "--out", str(out), "--progress", "lines"]) == 0
    printed = capsys.readouterr().out
    payload = torch.load(out, weights_only=True)
    figures = payload["extra"]["calibration"]
    assert payload["config"]["detect"]["lam"] == figures["lambda"] and f"λ = {figures['lambda']:g}" in printed
    assert figures["pooled_flagged_percent"] <= 2.0 and sorted(figures["per_scan_flagged_percent"]) == ["normal_a",
                                                                                                       "normal_b"]
    # independent check: detect with the calibrated model flags what calibration said, scan by scan
    for name in ("normal_a", "normal_b"):
        run = tmp_path / f"run_{name}"
        assert main(["detect", str(scans / f"{name}_ct.nii.gz"), "--model", str(out), "--out", str(run)]) == 0
        report = json.loads((run / "report.json").read_text(encoding="utf-8"))
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(run / "anomaly_mask.nii.gz"))) > 0
        lung = sitk.GetArrayFromImage(sitk.ReadImage(str(run / "lung_mask.nii.gz"))) > 0
        assert report["lambda"] == figures["lambda"]
        assert 100.0 * (mask & lung).sum() / lung.sum() == pytest.approx(figures["per_scan_flagged_percent"][name],
                                                                        abs=1e-3)


@pytest.mark.parametrize("target", ["0%", "60", "one"])
def test_a_target_outside_0_50_percent_is_refused(capsys, tmp_path, data_dir, target):
    assert main(["calibrate", "--scans", str(data_dir), "--target", target, "--out", str(tmp_path / "m.pt")]) == 2
    assert "--target" in capsys.readouterr().err


def test_calibrate_never_writes_over_its_model_or_scans(capsys, tmp_path, data_dir, tiny_checkpoint):
    model = tmp_path / "m.pt"
    model.write_bytes(tiny_checkpoint.read_bytes())
    before = model.read_bytes()
    assert main(["calibrate", "--model", str(model), "--scans", str(data_dir / "ct" / "normal_a_ct.nii.gz"),
                 "--out", str(model), "--overwrite"]) == 2
    assert "would replace or hold the input" in capsys.readouterr().err and model.read_bytes() == before
