"""Train a tiny model on two synthetic volumes, detect on a third: outputs, geometry, determinism, batching."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SACDiffLib.checkpoint import load_checkpoint
from SACDiffLib.detect import detect_volume, error_maps, reconstruct_ensemble, rethreshold
from SACDiffLib.outputs import FILES, load_run, write_run


def _detect(data_dir, ckpt, **overrides):
    cfg, model, diffusion, _ = load_checkpoint(ckpt)
    for k, v in overrides.items():
        setattr(cfg.detect, k, v)
    return detect_volume(data_dir / "ct" / "sick_ct.nii.gz", model, diffusion, cfg,
                         lung_path=data_dir / "ct" / "sick_lung.nii.gz")


def test_detection_writes_every_output_with_the_ct_geometry(data_dir, tiny_checkpoint, tmp_path):
    result = _detect(data_dir, tiny_checkpoint)
    out = write_run(result, tmp_path / "run")
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES.values())
    ct = sitk.ReadImage(str(data_dir / "ct" / "sick_ct.nii.gz"))
    for key in ("anomaly_map", "uncertainty", "pseudo_healthy", "anomaly_mask", "lung_mask"):
        img = sitk.ReadImage(str(out / FILES[key]))
        assert img.GetSize() == ct.GetSize()
        np.testing.assert_allclose(img.GetSpacing(), ct.GetSpacing())
        np.testing.assert_allclose(img.GetOrigin(), ct.GetOrigin())
        np.testing.assert_allclose(img.GetDirection(), ct.GetDirection())
    assert sitk.ReadImage(str(out / FILES["anomaly_mask"])).GetPixelID() == sitk.sitkUInt8
    report = json.loads((out / "report.json").read_text())
    for key in ("lambda", "threshold", "quantification", "slice_scores", "timings", "seed", "config", "versions"):
        assert key in report
    q = report["quantification"]
    assert len(report["slice_scores"]) == ct.GetDepth()
    assert q["right_lung_ml"] > 0 and q["left_lung_ml"] > 0
    assert 0 <= q["right_anomaly_percent"] <= 100
    # The anomaly map is zero outside the processed (lung) slices; the mask lies inside the lung.
    err = sitk.GetArrayFromImage(sitk.ReadImage(str(out / FILES["anomaly_map"])))
    unprocessed = sorted(set(range(ct.GetDepth())) - set(report["processed_slices"]))
    assert unprocessed and not err[unprocessed].any()
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / FILES["anomaly_mask"])))
    lung = sitk.GetArrayFromImage(sitk.ReadImage(str(out / FILES["lung_mask"])))
    assert not (mask.astype(bool) & (lung == 0)).any()
    assert not list(tmp_path.glob(".run.tmp*"))


def test_same_seed_same_result_and_other_seed_differs(data_dir, tiny_checkpoint):
    a = _detect(data_dir, tiny_checkpoint, seed=3)
    b = _detect(data_dir, tiny_checkpoint, seed=3)
    c = _detect(data_dir, tiny_checkpoint, seed=4)
    np.testing.assert_array_equal(a.error, b.error)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert not np.allclose(a.error, c.error)


def test_result_does_not_depend_on_the_chunk_size(data_dir, tiny_checkpoint):
    whole = _detect(data_dir, tiny_checkpoint, batch_size=0)
    chunked = _detect(data_dir, tiny_checkpoint, batch_size=3)
    np.testing.assert_allclose(whole.error, chunked.error, rtol=1e-4, atol=1e-6)


def test_every_slice_sees_the_same_noise_and_members_differ(tiny_checkpoint):
    cfg, model, diffusion, _ = load_checkpoint(tiny_checkpoint)
    x = torch.full((1, 1, 32, 32), -0.5).expand(4, 1, 32, 32).contiguous()  # four identical slices
    members = reconstruct_ensemble(model, diffusion, x, torch.ones_like(x), 5, 3, seed=1)
    assert members.shape == (3, 4, 1, 32, 32)
    for s in range(1, 4):
        torch.testing.assert_close(members[:, s], members[:, 0])
    assert not torch.allclose(members[0], members[1])


def test_error_map_readings_and_uncertainty_closed_form():
    x = torch.zeros(1, 1, 1, 2)
    members = torch.tensor([1.0, 3.0]).view(2, 1, 1, 1, 1).expand(2, 1, 1, 1, 2)
    e, std, mean = error_maps(x, members, "mean-of-errors")
    assert torch.allclose(e, torch.full_like(e, (1 + 9) / 2))  # mean of (0−1)², (0−3)²
    assert torch.allclose(std, torch.ones_like(std)) and torch.allclose(mean, torch.full_like(mean, 2.0))
    e2, _, _ = error_maps(x, members, "error-of-mean")
    assert torch.allclose(e2, torch.full_like(e2, 4.0))  # (0 − 2)²; = e − σ²


def test_rethreshold_changes_the_mask_only(data_dir, tiny_checkpoint, tmp_path):
    result = _detect(data_dir, tiny_checkpoint, crf=False)
    write_run(result, tmp_path / "run")
    run = load_run(tmp_path / "run")
    error_before = run.error.copy()
    low = rethreshold(run, -1.0).mask.sum()
    high = rethreshold(run, 3.0).mask.sum()
    assert low > high
    np.testing.assert_array_equal(run.error, error_before)
    assert run.report["lambda"] == 3.0


@pytest.mark.skipif(not (__import__("conftest").SHARED_DATA / "cases.json").exists(),
                    reason="real CT data (../shared/data) not present")
def test_real_512_ct_keeps_its_geometry(tiny_checkpoint, tmp_path):
    from conftest import SHARED_DATA

    cfg, model, diffusion, _ = load_checkpoint(tiny_checkpoint)
    cfg.detect.steps, cfg.detect.ensemble, cfg.detect.crf = 2, 1, False
    ct_path = SHARED_DATA / "ct" / "nsclc_lung1_ct.nii.gz"
    result = detect_volume(ct_path, model, diffusion, cfg, SHARED_DATA / "ct" / "nsclc_lung1_lung.nii.gz")
    out = write_run(result, tmp_path / "run")
    ct = sitk.ReadImage(str(ct_path))
    for name in FILES.values():
        if name.endswith(".nii.gz"):
            img = sitk.ReadImage(str(out / name))
            assert img.GetSize() == ct.GetSize() == (512, 512, 48)
            np.testing.assert_allclose(img.GetSpacing(), ct.GetSpacing(), rtol=1e-6)
            np.testing.assert_allclose(img.GetOrigin(), ct.GetOrigin(), atol=1e-4)
            np.testing.assert_allclose(img.GetDirection(), ct.GetDirection(), atol=1e-6)
    q = result.report["quantification"]
    assert 1500 < q["lung_ml"] < 9000  # adult lungs
