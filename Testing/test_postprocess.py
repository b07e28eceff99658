import numpy as np
import pytest

from SACDiffLib.errors import SACDiffError
from SACDiffLib.postprocess import background_threshold, binarise, crf_refine, fixed_threshold, quantify


def _case():
    rng = np.random.default_rng(0)
    error = rng.uniform(0, 0.1, (3, 20, 20)).astype(np.float32)
    lung = np.zeros((3, 20, 20), np.uint8)
    lung[:, 4:16, 2:9] = 1
    lung[:, 4:16, 11:18] = 2
    error[1, 6:11, 3:8] = 1.0  # a 5×5 anomaly in the right lung of slice 1
    return error, lung


def test_adaptive_threshold_is_background_median_plus_lambda_normal_mad():
    """Against scipy: α = median + λ · median_abs_deviation(scale="normal") of the background."""
    from scipy.stats import median_abs_deviation

    error, lung = _case()
    processed = np.array([0, 1])
    bg = np.concatenate([error[z][lung[z] == 0] for z in processed])
    th = background_threshold(error, lung, processed, lam=1.5)
    scale = median_abs_deviation(bg, scale="normal")
    assert th.alpha == pytest.approx(np.median(bg) + 1.5 * scale, rel=1e-4)
    assert th.background_location == pytest.approx(np.median(bg), rel=1e-6)
    th_neg = background_threshold(error, lung, processed, lam=-0.25)
    assert th_neg.alpha < th.alpha


def test_binarise_without_crf_or_morphology_is_the_plain_threshold_inside_the_lung():
    error, lung = _case()
    processed = np.array([0, 1, 2])
    th = fixed_threshold(error, lung, processed, 0.5)
    mask = binarise(error, lung, processed, th, crf=False, morphology_radius=0)
    assert np.array_equal(mask.astype(bool), (error > 0.5) & (lung > 0))


def test_opening_removes_specks_and_keeps_blobs():
    error, lung = _case()
    error[2, 12, 14] = 1.0  # an isolated voxel in the left lung
    th = fixed_threshold(error, lung, np.arange(3), 0.5)
    mask = binarise(error, lung, np.arange(3), th, crf=False, morphology_radius=1)
    assert mask[2].sum() == 0
    # A 5×5 square opened with the radius-1 disk (a plus) loses only its 4 corners.
    assert mask[1].sum() == 21 and mask[1, 7:10, 3:8].all() and mask[1, 6:11, 4:7].all()


def test_crf_keeps_a_clear_blob_and_smooths_a_noisy_one():
    error = np.zeros((30, 30), np.float32)
    error[10:20, 10:20] = 1.0
    clean = crf_refine(error, alpha=0.5, scale=0.1)
    assert clean[11:19, 11:19].all() and not clean[:5].any()
    noisy = error.copy()
    noisy[12, 12] = 0.45  # a voxel just below α inside the blob joins it
    noisy[25, 25] = 0.7  # an isolated voxel just above α is dropped
    smoothed = crf_refine(noisy, alpha=0.5, scale=0.1)
    assert smoothed[12, 12] and not smoothed[25, 25]
    assert (noisy > 0.5)[25, 25] and not (noisy > 0.5)[12, 12]  # the plain threshold does the opposite


def test_quantify_volumes_hand_computed():
    lung = np.zeros((2, 4, 4), np.uint8)
    lung[:, :, :2] = 1  # right: 16 voxels
    lung[:, :, 2:] = 2  # left: 16 voxels
    mask = np.zeros_like(lung)
    mask[0, 0, 0:3] = 1  # 2 right, 1 left
    q = quantify(mask, lung, (2.0, 2.0, 2.5))  # 10 mm³ per voxel = 0.01 ml
    assert q["anomaly_ml"] == pytest.approx(0.03)
    assert q["right_anomaly_percent"] == pytest.approx(100 * 2 / 16)
    assert q["left_anomaly_percent"] == pytest.approx(100 * 1 / 16)
    assert q["slice_anomaly_ml"] == [0.03, 0.0]


def _binarise_whole_volume(error, lung, processed, threshold, crf, radius):
    """Reference: the straightforward whole-volume version (per-slice CRF on the slice's lung box + 8 px)."""
    from scipy import ndimage

    mask = np.zeros(error.shape, bool)
    inside = lung > 0
    for z in processed:
        if not ((error[z] > threshold.alpha) & inside[z]).any():
            continue
        if crf:
            ys, xs = np.nonzero(inside[z])
            y0, y1 = max(ys.min() - 8, 0), min(ys.max() + 9, error.shape[1])
            x0, x1 = max(xs.min() - 8, 0), min(xs.max() + 9, error.shape[2])
            scale = threshold.background_scale
            mask[z, y0:y1, x0:x1] = crf_refine(error[z, y0:y1, x0:x1], threshold.alpha, scale)
        else:
            mask[z] = error[z] > threshold.alpha
    yy, xx = np.mgrid[-radius: radius + 1, -radius: radius + 1]
    mask = ndimage.binary_opening(mask, structure=(yy**2 + xx**2 <= radius**2)[None])
    return (mask & inside).astype(np.uint8)


@pytest.mark.parametrize("crf,radius", [(False, 1), (False, 2), (True, 1)])
def test_binarise_on_the_lung_box_equals_the_whole_volume_reference(crf, radius):
    rng = np.random.default_rng(1)
    error = rng.gamma(2.0, 0.01, (9, 80, 96)).astype(np.float32)
    error[3:6, 30:45, 20:35] += 0.1
    lung = np.zeros(error.shape, np.uint8)
    lung[1:8, 20:60, 12:44] = 1
    lung[2:8, 22:58, 50:86] = 2
    processed = np.arange(1, 8)
    t = background_threshold(error, lung, processed, 0.5)
    got = binarise(error, lung, processed, t, crf=crf, morphology_radius=radius)
    np.testing.assert_array_equal(got, _binarise_whole_volume(error, lung, processed, t, crf, radius))
    assert got.any()


@pytest.mark.parametrize("radius", [1, 2, 3])
def test_fast_opening_equals_scipy(radius):
    from scipy import ndimage

    from SACDiffLib.postprocess import opening_in_plane

    rng = np.random.default_rng(radius)
    mask = rng.random((3, 40, 50)) > 0.35
    yy, xx = np.mgrid[-radius: radius + 1, -radius: radius + 1]
    expected = ndimage.binary_opening(mask, structure=(yy**2 + xx**2 <= radius**2)[None])
    np.testing.assert_array_equal(opening_in_plane(mask, radius), expected)


def _pydensecrf_reference(error, alpha, scale, iterations=5):
    dcrf = pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 (the reference) is not installed")
    h, w = error.shape
    p = np.clip(1.0 / (1.0 + np.exp(-np.clip((error - alpha) / scale, -30, 30))), 1e-5, 1 - 1e-5)
    crf = dcrf.DenseCRF2D(w, h, 2)
    crf.setUnaryEnergy(np.ascontiguousarray(-np.log(np.stack([1.0 - p, p]).reshape(2, -1)).astype(np.float32)))
    crf.addPairwiseGaussian(sxy=3, compat=3)
    q = np.array(crf.inference(iterations)).reshape(2, h, w)
    return q[1] > q[0]


@pytest.mark.parametrize("seed", range(4))
def test_own_dense_crf_matches_pydensecrf(seed):
    """Blobs of high error in a noisy background, thresholds from loose to strict: the numpy mean-field CRF and
    pydensecrf's permutohedral-lattice CRF agree on ≥ 99 % of pixels (Dice ≥ 0.98 on the foreground)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    h, w = 120, 150
    yy, xx = np.mgrid[:h, :w]
    error = np.abs(rng.normal(0.01, 0.006, (h, w)))
    for _ in range(5):
        cy, cx, r = rng.integers(10, h - 10), rng.integers(10, w - 10), rng.integers(3, 15)
        error[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] += rng.uniform(0.005, 0.03)
    error += ndimage.gaussian_filter(rng.normal(0, 0.004, (h, w)), 1)
    for alpha in (0.012, 0.016, 0.02):
        ours, ref = crf_refine(error, alpha, 0.006), _pydensecrf_reference(error, alpha, 0.006)
        assert (ours == ref).mean() >= 0.99
        assert 2 * (ours & ref).sum() / (ours.sum() + ref.sum()) >= 0.98


def test_background_is_the_body_outside_the_lung_so_the_air_around_the_patient_does_not_move_alpha():
    """α = mean + λ·std over body voxels outside the lung (closed form on a hand-made case): any error in the air
    around the patient or on the table, and any amount of that air, leave α unchanged."""
    from SACDiffLib.lung import body_mask

    hu = np.full((2, 40, 40), -1000.0)
    yy, xx = np.mgrid[:40, :40]
    disc = (yy - 18) ** 2 + (xx - 20) ** 2 <= 14**2
    hu[:, disc] = 40.0
    lung = np.zeros(hu.shape, np.uint8)
    lung[:, 12:24, 10:18] = 1
    hu[lung > 0] = -850.0
    hu[:, 36:38, 5:35] = 300.0  # the table: dense, not touching the body
    body = body_mask(hu)
    assert body[:, disc].all() and not body[:, 36:38].any() and not body[:, 0, 0].any()
    error = np.zeros(hu.shape, np.float32)
    error[:, disc] = np.where((xx[disc] % 2) == 0, 0.1, 0.3)  # body: half 0.1, half 0.3
    error[lung > 0] = 5.0  # inside the lung: not background
    error[~body] = 7.0  # air and table: not background either
    processed = np.arange(2)
    expected = error[(body & (lung == 0))]
    th = background_threshold(error, lung, processed, 2.0, body)
    assert th.background_location == pytest.approx(0.2, abs=0.1 + 1e-6)  # half 0.1, half 0.3 (ties: either)
    assert th.alpha == pytest.approx(float(np.median(expected) + 2.0 * 1.4826 * np.median(np.abs(expected - np.median(expected)))), rel=1e-6)
    error[~body] = 70.0
    assert background_threshold(error, lung, processed, 2.0, body).alpha == pytest.approx(th.alpha, rel=1e-6)


def test_a_heavy_tail_outside_the_lung_does_not_move_alpha():
    """1 % of background voxels with a huge error (the body cut by the field of view, bone edges): α stays at the
    bulk's mean + λ·std (Gaussian bulk: known mean 0.01, std 0.002), where the plain mean/std would triple it."""
    rng = np.random.default_rng(1)
    lung = np.zeros((2, 100, 100), np.uint8)
    lung[:, 30:70, 30:70] = 1
    error = rng.normal(0.01, 0.002, lung.shape).astype(np.float32)
    outside = np.argwhere(lung == 0)
    tail = outside[rng.choice(len(outside), len(outside) // 100, replace=False)]
    error[tuple(tail.T)] = 1.0
    th = background_threshold(error, lung, np.arange(2), lam=3.0)
    assert th.alpha == pytest.approx(0.01 + 3 * 0.002, rel=0.03)
    plain = error[lung == 0]
    assert plain.mean() + 3 * plain.std() > 10 * th.alpha


def test_runs_written_with_mean_and_std_still_load():
    from SACDiffLib.postprocess import Threshold

    old = {"alpha": 0.2, "background_mean": 0.05, "background_std": 0.15, "lam": 1.0, "mode": "adaptive"}
    th = Threshold.from_report(old)
    assert (th.background_location, th.background_scale, th.statistic) == (0.05, 0.15, "mean + std")


def _lung_and_spacing():
    lung = np.zeros((2, 60, 50), np.uint8)
    lung[:, 20:40, 15:30] = 1
    lung[1, 25:30, 30:33] = 1  # a bump on one slice
    return lung, (1.0, 2.0)  # (y, x) mm: anisotropic pixels


def test_lung_shell_background_is_the_body_within_5_mm_of_the_lung_by_brute_force():
    """Shell pixels found by measuring every pixel's distance in mm to every lung pixel of its slice (no distance
    transform): the lung-shell background is exactly their errors, and α follows from them."""
    from SACDiffLib.postprocess import SHELL_MM, _background

    lung, spacing_yx = _lung_and_spacing()
    rng = np.random.default_rng(4)
    error = rng.uniform(0, 1, lung.shape).astype(np.float32)
    yy, xx = np.mgrid[:60, :50]
    shell = np.zeros(lung.shape, bool)
    for z in range(2):
        ly, lx = np.nonzero(lung[z])
        d = np.hypot((yy[..., None] - ly) * spacing_yx[0], (xx[..., None] - lx) * spacing_yx[1]).min(-1)
        shell[z] = (d <= SHELL_MM) & (lung[z] == 0)
    processed = np.arange(2)
    got = _background(error, lung, processed, region="lung-shell", spacing_yx=spacing_yx)
    assert np.array_equal(np.sort(got), np.sort(error[shell]))
    th = background_threshold(error, lung, processed, 3.0, region="lung-shell", spacing_yx=spacing_yx)
    location = np.median(error[shell])
    scale = 1.4826 * np.median(np.abs(error[shell] - location))
    assert th.region == "lung-shell" and th.alpha == pytest.approx(location + 3.0 * scale, rel=1e-6)
    with pytest.raises(SACDiffError, match="pixel size"):
        background_threshold(error, lung, processed, 3.0, region="lung-shell")


def test_lung_background_is_the_lung_itself_on_the_processed_slices():
    """Round 24's region: α from E inside the lung (its median and 1.4826·MAD by hand), unprocessed slices left out."""
    lung, _ = _lung_and_spacing()
    rng = np.random.default_rng(6)
    error = rng.uniform(0, 1, lung.shape).astype(np.float32)
    processed = np.array([1])
    inside = error[1][lung[1] > 0]
    th = background_threshold(error, lung, processed, 24.0, region="lung")
    location = np.median(inside)
    scale = 1.4826 * np.median(np.abs(inside - location))
    assert th.region == "lung" and th.alpha == pytest.approx(location + 24.0 * scale, rel=1e-6)
    assert th.background_location == pytest.approx(location)


def test_deep_map_opening_matches_scikit_image_and_keeps_blobs_not_tubes():
    """``opened`` (round 22's opening of the deep chain's map): the ellipsoid in voxels of the scan's spacing, and the
    grey-level opening equal to scikit-image's with the same footprint; a 6 mm blob keeps its core, a 2 mm sheet
    vanishes."""
    from skimage.morphology import opening

    from SACDiffLib.postprocess import ball, opened

    spacing = (2.0, 0.5, 0.5)  # z, y, x in mm
    footprint = ball(3.0, spacing)
    assert footprint.shape == (1, 7, 7) and footprint[0, 3].all() and not footprint[0, 0, 0]  # radius 1.5 mm: 3 px
    error = np.zeros((12, 40, 40), np.float32)
    error[3:9, 5:17, 5:17] = 1.0  # a 12 × 6 × 6 mm blob
    error[:, 30:34, :] = 0.5  # a 2 mm thick sheet along z and x: thinner than the 3 mm ball
    got = opened(error, 3.0, spacing)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, opening(error, footprint))
    assert got[6, 10, 10] == 1.0 and not got[:, 28:36, :].any()


def test_lung_shell_alpha_is_the_same_on_an_image_cut_to_the_lungs_and_the_body_alpha_is_not():
    """The property the region was chosen for (map-candidates.md round 14): cutting the image to the lungs' bounding
    box plus 5 mm leaves α from the shell unchanged, while α from the whole body moves."""
    lung, spacing_yx = _lung_and_spacing()
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:60, :50]
    far = np.hypot(yy - 30, xx - 22) / 10.0  # the error grows away from the lungs, as the outer body's does
    error = (rng.uniform(0, 0.1, lung.shape) + far).astype(np.float32)
    body = np.ones(lung.shape, bool)
    zs, ys, xs = np.nonzero(lung)
    my, mx = int(np.ceil(5.0 / spacing_yx[0])), int(np.ceil(5.0 / spacing_yx[1]))
    cut = (slice(None), slice(ys.min() - my, ys.max() + my + 1), slice(xs.min() - mx, xs.max() + mx + 1))
    processed = np.arange(2)
    alphas = {}
    for name, (e, m, b) in {"whole": (error, lung, body), "cut": (error[cut], lung[cut], body[cut])}.items():
        alphas[name] = {region: background_threshold(e, m, processed, 12.0, b, region=region,
                                                     spacing_yx=spacing_yx).alpha for region in ("body", "lung-shell")}
    assert alphas["cut"]["lung-shell"] == alphas["whole"]["lung-shell"]
    assert abs(alphas["cut"]["body"] - alphas["whole"]["body"]) > 0.1 * alphas["whole"]["body"]
