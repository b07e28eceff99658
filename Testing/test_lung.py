import numpy as np

from conftest import SHARED_DATA, make_chest, needs_shared_data, to_image
from SACDiffLib import io
from SACDiffLib.lung import LEFT, RIGHT, body_mask, lung_labels, segment_lungs, split_left_right
from SACDiffLib.metrics import segmentation_metrics


def test_fallback_finds_both_lungs_with_correct_sides():
    hu, truth, _ = make_chest(64, 12, seed=4)
    labels = segment_lungs(hu, to_image(hu))
    assert segmentation_metrics(labels == RIGHT, truth == RIGHT)["dice"] > 0.9
    assert segmentation_metrics(labels == LEFT, truth == LEFT)["dice"] > 0.9


def test_sides_follow_the_physical_frame():
    """Flip the direction of x: the voxels of the right lung are now at large index x."""
    hu, truth, _ = make_chest(64, 12, seed=4)
    image = to_image(hu)
    image.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1))
    labels = split_left_right(truth > 0, image)
    assert np.array_equal(labels == LEFT, truth == RIGHT)


def test_connected_lungs_are_cut_at_the_centroid():
    mask = np.zeros((2, 10, 10), bool)
    mask[:, 3:7, 1:9] = True  # one bar across the midline
    labels = split_left_right(mask, to_image(mask.astype(np.uint8)))
    assert (labels[:, 3:7, 1:5] == RIGHT).all() and (labels[:, 3:7, 5:9] == LEFT).all()


def test_existing_labels_are_kept():
    lab = np.zeros((1, 4, 4), np.uint8)
    lab[0, 0, 0], lab[0, 3, 3] = RIGHT, LEFT
    assert np.array_equal(lung_labels(lab, to_image(lab))[0], lab)


@needs_shared_data
def test_fallback_agrees_with_the_provided_mask_on_real_ct():
    ct = io.read_ct(SHARED_DATA / "ct" / "ctmd_normal001_ct.nii.gz")
    given = io.read_mask(SHARED_DATA / "ct" / "ctmd_normal001_lung.nii.gz", ct)
    ours = segment_lungs(io.ct_array(ct), ct)
    assert segmentation_metrics(ours > 0, given > 0)["dice"] > 0.9
    # Right lung at smaller physical x (LPS) than the left.
    xs = {}
    for lab in (RIGHT, LEFT):
        z, y, x = np.argwhere(ours == lab).mean(axis=0)
        xs[lab] = ct.TransformContinuousIndexToPhysicalPoint((x, y, z))[0]
    assert xs[RIGHT] < xs[LEFT]


def test_a_one_lung_mask_stays_one_lung_and_only_unlabeled_masks_are_split():
    """Body 40..88 of x, midline at 64 (physical x grows with the index: identity direction, LPS → patient's
    right is the low-x side). A one-lung mask labelled 1 lying on the right stays all right (it used to be cut in
    two at its own centroid); the same lung given as label 2 stays left as given; a binary mask of two lungs is
    split by side; a one-lung binary mask on the left is labelled left by its side."""
    hu = np.full((4, 64, 128), -1000, np.int16)
    hu[:, 8:56, 24:104] = 30  # body, midline x = 63.5
    right = np.zeros(hu.shape, np.uint8)
    right[:, 16:48, 30:60] = 1
    left = np.zeros(hu.shape, np.uint8)
    left[:, 16:48, 68:98] = 1
    hu[(right + left) > 0] = -850
    image = to_image(hu)
    body = body_mask(hu)
    labels, how = lung_labels(right, image, body)
    assert set(np.unique(labels[right > 0])) == {RIGHT} and "one lung" in how
    labels, how = lung_labels(right * 2, image, body)
    assert set(np.unique(labels[right > 0])) == {LEFT} and "as given" in how
    labels, how = lung_labels(right + left, image, body)
    assert (labels[right > 0] == RIGHT).all() and (labels[left > 0] == LEFT).all() and "split" in how
    labels, how = lung_labels(left, image, body)
    assert set(np.unique(labels[left > 0])) == {LEFT} and "one lung (left" in how
