"""The fallback lung mask on real CT: the trachea out, the nsclc tumour in, airway exclusion on a given mask.
Skips without ../shared/data."""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SACDiffLib.lung import airway_tree, exclude_airways, segment_lungs

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ct"
pytestmark = pytest.mark.skipif(not (DATA / "nsclc_lung1_ct.nii.gz").exists(), reason="../shared/data absent")


def _read(name):
    image = sitk.ReadImage(str(DATA / name))
    return image, sitk.GetArrayFromImage(image)


def _trachea_slices(hu, image):
    """Slices of the cranial half where a round air disc sits in the middle of the body: found independently of
    lung.py by thresholding (< −700 HU) and taking the component nearest the body's centre."""
    from scipy import ndimage

    found = {}
    up = image.TransformIndexToPhysicalPoint((0, 0, hu.shape[0] - 1))[2] > image.GetOrigin()[2]
    for z in range(hu.shape[0] // 2, hu.shape[0]) if up else range(hu.shape[0] // 2):
        body = np.nonzero((hu[z] > -320).any(axis=0))[0]
        if body.size == 0:
            continue
        labels, n = ndimage.label(hu[z] < -700)
        centre = (body[0] + body[-1]) / 2
        for i, sl in enumerate(ndimage.find_objects(labels), start=1):
            area = (labels[sl] == i).sum() * image.GetSpacing()[0] * image.GetSpacing()[1]
            cx = (sl[1].start + sl[1].stop) / 2
            if 80 <= area <= 500 and abs(cx - centre) < 0.1 * (body[-1] - body[0]) and sl[0].start > 0:
                found[z] = labels == i
    return found


@pytest.mark.parametrize("case", ["nsclc_lung1", "ctmd_P001"])
def test_fallback_leaves_the_trachea_out_where_it_is_visible(case):
    image, hu = _read(f"{case}_ct.nii.gz")
    lung = segment_lungs(hu, image) > 0
    with_airways = segment_lungs(hu, image, airways=True) > 0
    trachea = _trachea_slices(hu, image)
    in_mask = {z: d for z, d in trachea.items() if (d & with_airways[z]).mean() > 0}  # where the old mask had it
    assert len(in_mask) >= 3
    for z, disc in in_mask.items():
        assert (disc & lung[z]).sum() <= 0.15 * disc.sum(), f"slice {z}: airway left in the lung mask"  # rim
    removed_ml = (with_airways & ~lung).sum() * np.prod(image.GetSpacing()) / 1000
    assert 2 < removed_ml < 100  # trachea and bronchi, not a lobe


def test_fallback_keeps_the_whole_nsclc_tumour():
    image, hu = _read("nsclc_lung1_ct.nii.gz")
    tumour = sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / "nsclc_lung1_lesion.nii.gz"))) > 0
    assert (tumour & (segment_lungs(hu, image) > 0)).sum() == tumour.sum()


def test_airway_exclusion_applies_to_a_given_mask_and_keeps_its_labels():
    image, hu = _read("ctmd_normal001_ct.nii.gz")
    given = sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / "ctmd_normal001_lung.nii.gz"))).astype(np.uint8)
    given = np.where(given > 0, 1 + (np.arange(given.shape[2]) >= given.shape[2] // 2), 0).astype(np.uint8)
    cleaned = exclude_airways(hu, given, image)
    removed = (given > 0) & (cleaned == 0)
    assert removed.sum() > 0 and np.array_equal(removed, airway_tree(hu, given > 0, image))
    assert np.array_equal(cleaned[~removed], given[~removed])  # everything else, labels included, unchanged
