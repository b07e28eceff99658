"""MedSeg harness: orientation from the anatomy, grey → HU fit against a real CT's HU, and the slice scoring rules
(empty truth apart, pooled Dice, whole-lung baseline) on hand-computed cases."""

from pathlib import Path

import numpy as np
import pytest

from SACDiffLib.experiments import medseg

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MEDSEG = DATA / "slices" / "medseg_covid"
needs_medseg = pytest.mark.skipif(not (MEDSEG / "image").is_dir(), reason="../shared/data MedSeg slices absent")
needs_ct = pytest.mark.skipif(not (DATA / "ct" / "ctmd_normal001_ct.nii.gz").exists(), reason="../shared/data absent")


def _anatomy_votes(transform):
    """Fractions of MedSeg slices whose (spine lies in the lower half) and (the image's left half holds more air than
    its right half: the patient's right lung is the larger one, the heart bulges to the patient's left)."""
    from PIL import Image

    spine_low, right_lung_larger = [], []
    for path in medseg.list_slices(MEDSEG):
        grey = transform(np.asarray(Image.open(path).convert("L")))
        hu, _ = medseg.grey_to_hu(grey)
        h, w = grey.shape
        ys, _ = np.nonzero(grey[:, w // 3: 2 * w // 3] >= 245)  # bone, central third of the columns
        spine_low.append(ys.size > 0 and ys.mean() / h > 0.5)
        air = hu < -400
        right_lung_larger.append(air[:, : w // 2].sum() > air[:, w // 2:].sum())
    return np.mean(spine_low), np.mean(right_lung_larger)


@needs_medseg
def test_to_axial_gives_the_radiological_view_and_a_rotation_would_mirror_the_patient():
    spine_low, right_larger = _anatomy_votes(medseg.to_axial)
    assert spine_low >= 0.85 and right_larger >= 0.75  # posterior down, patient's right on the image's left
    _, rotated_right_larger = _anatomy_votes(lambda g: np.rot90(g, -1))  # spine down too, but mirrored
    assert rotated_right_larger <= 0.25


@needs_ct
def test_grey_to_hu_recovers_the_hu_of_a_real_ct_slice_windowed_to_8_bit():
    """A real CT slice cropped to the chest and windowed like the MedSeg images (W 1300 / L −450, soft tissue not
    saturated) and one with saturated soft tissue (W 1100 / L −550): the fit puts lung and soft tissue back near
    their true HU."""
    import SimpleITK as sitk

    hu = sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / "ct" / "ctmd_normal001_ct.nii.gz")))[80].astype(float)
    lung = sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / "ct" / "ctmd_normal001_lung.nii.gz")))[80] > 0
    ys, xs = np.nonzero(lung)
    chest = (slice(ys.min() - 10, ys.max() + 10), slice(xs.min() - 10, xs.max() + 10))  # cropped like MedSeg
    hu, lung = hu[chest], lung[chest]
    soft = (hu > 0) & (hu < 80)
    for lo, hi, saturated in ((-1100, 200, False), (-1100, 0, True)):
        grey = np.clip((hu - lo) / (hi - lo) * 255, 0, 255).round().astype(np.uint8)
        fitted, fit = medseg.grey_to_hu(grey)
        assert fit["soft_tissue_saturated"] is saturated
        assert abs(np.median(fitted[lung]) - np.median(hu[lung])) < 60
        if not saturated:
            assert abs(np.median(fitted[soft]) - np.median(hu[soft])) < 80
            assert fit["window_hu"] == pytest.approx([lo, hi], abs=200)


def test_score_slices_keeps_empty_truth_apart_and_pools_by_hand():
    lung = np.zeros((1, 4, 4), bool)
    lung[0, :, :2] = True  # 8 lung pixels
    truth_a = np.zeros_like(lung); truth_a[0, 0, :2] = True  # 2 lesion pixels in the lung  # noqa: E702
    pred_a = np.zeros_like(lung); pred_a[0, 0, 0] = pred_a[0, 1, 0] = True  # 1 TP, 1 FP  # noqa: E702
    truth_b = np.zeros_like(lung); truth_b[0, :, 0] = True; truth_b[0, 0, 3] = True  # 4 in, 1 outside  # noqa: E702
    pred_b = truth_b & lung  # perfect inside the lung
    empty = np.zeros_like(lung)
    slices = [{"name": "a", "pred": pred_a, "truth": truth_a, "lung": lung, "error": pred_a * 1.0},
              {"name": "b", "pred": pred_b, "truth": truth_b, "lung": lung, "error": pred_b * 1.0},
              {"name": "c", "pred": empty, "truth": empty, "lung": lung, "error": empty * 1.0}]
    s = medseg.score_slices(slices)
    assert s["no_truth_in_lung"] == ["c"] and s["n_scored"] == 2
    assert s["mean"]["dice"]["mean"] == pytest.approx((2 * 1 / (2 + 1 + 1) + 1.0) / 2)  # 0.5 and 1
    assert s["pooled"]["dice"] == pytest.approx(2 * 5 / (2 * 5 + 1 + 1))  # TP 1+4, FP 1, FN 1
    assert s["baseline_pooled_dice"] == pytest.approx(2 * 6 / (16 + 6))  # 16 lung pixels, 6 truth inside
    assert s["mean"]["baseline_dice"]["mean"] == pytest.approx((2 * 2 / 10 + 2 * 4 / 12) / 2)
    assert s["truth_outside_lung_fraction"] == pytest.approx(1 / 7)
    assert s["oracle_dice"] == pytest.approx(s["pooled"]["dice"])  # E = the prediction itself
