"""Vessel suppression of the error map (``vessels.py``): against scikit-image's Frangi filter, on hand-made tubes
and balls, single slices left alone, and through a detection."""

import numpy as np
import pytest

from SACDiffLib.vessels import MIN_EXTENT_MM, SIGMAS_MM, WINDOW_HU, suppress_vessels, vesselness


def _phantom(spacing_xyz, shape=(40, 96, 96)):
    """Aerated lung (−850 HU) holding a vessel along z (radius 2 mm), a vessel in the slice plane (radius 1.5 mm)
    and a ball (radius 6 mm, a nodule), in mm on the given voxel spacing."""
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]].astype(float)
    zm, ym, xm = z * spacing_xyz[2], y * spacing_xyz[1], x * spacing_xyz[0]
    hu = np.full(shape, -850.0, np.float32)
    parts = {"end-on vessel": np.hypot(ym - 25, xm - 25) < 2.0,
             "in-plane vessel": np.hypot(zm - 40, ym - 70) < 1.5,
             "ball": np.sqrt((zm - 40) ** 2 + (ym - 50) ** 2 + (xm - 55) ** 2) < 6.0}
    hu[parts["end-on vessel"] | parts["in-plane vessel"]] = -50.0
    hu[parts["ball"]] = 20.0
    return hu, parts


def test_frangi_bright_is_frangis_equation_on_scikit_image_hessians():
    """Reference made here from scikit-image's Hessians and eigenvalues (``hessian_matrix``,
    ``hessian_matrix_eigvals``) and Frangi's eqs. 10–13 written out; away from the border (the two kernels' tails
    differ there) equal up to the 0.5 % floor below which ``frangi_bright`` skips the eigenvalues. On the tube,
    scikit-image's own ``frangi`` agrees too (it differs only just outside the wall, see ``frangi_bright``)."""
    from skimage.feature import hessian_matrix, hessian_matrix_eigvals
    from skimage.filters import frangi

    from SACDiffLib.vessels import frangi_bright

    hu, parts = _phantom((1.0, 1.0, 1.0), (48, 64, 64))
    image = np.clip(hu, *WINDOW_HU)
    expected, gamma = np.zeros(image.shape), None
    for sigma in (2.0, 3.0):
        h = hessian_matrix(-image, sigma, mode="nearest", use_gaussian_derivatives=True)
        eig = hessian_matrix_eigvals(h)
        eig = np.take_along_axis(eig, np.abs(eig).argsort(0), 0)
        s = np.sqrt((eig ** 2).sum(0))
        gamma = gamma or s.max() / 2
        l2, l3 = np.maximum(eig[1], 1e-10), np.maximum(eig[2], 1e-10)
        v = ((eig[1] > 0) & (eig[2] > 0)) * (1 - np.exp(-(l2 / l3) ** 2 / 0.5)) \
            * np.exp(-(np.abs(eig[0]) / np.sqrt(l2 * l3)) ** 2 / 0.5) * (1 - np.exp(-s ** 2 / (2 * gamma ** 2)))
        expected = np.maximum(expected, v)
    got = frangi_bright(image, [2.0, 3.0])
    inner = (slice(10, -10),) * 3
    assert np.abs(got[inner] - expected[inner]).max() < 0.01
    tube = parts["end-on vessel"]
    reference = frangi(image, sigmas=[2.0, 3.0], alpha=0.5, beta=0.5, black_ridges=False, mode="nearest")
    assert np.median(got[tube]) == pytest.approx(np.median(reference[tube]), abs=0.01)
    assert np.median(got[tube]) > 2 * np.median(got[parts["ball"]])


def test_vesselness_needs_no_resampling_on_isotropic_voxels():
    """1 mm voxels and a lung that fills the image: ``vesselness`` is ``frangi_bright`` of the windowed CT."""
    from SACDiffLib.vessels import frangi_bright

    hu, _ = _phantom((1.0, 1.0, 1.0), (48, 64, 64))
    expected = frangi_bright(np.clip(hu, *WINDOW_HU), list(SIGMAS_MM))
    assert np.allclose(vesselness(hu, np.ones(hu.shape, bool), (1.0, 1.0, 1.0)), expected, atol=1e-6)


def test_vessels_lose_their_error_and_a_ball_keeps_it_on_anisotropic_slices():
    spacing = (0.8, 0.8, 2.0)
    hu, parts = _phantom(spacing)
    lung = np.ones(hu.shape, bool)
    lung[:, :, :4] = False  # a strip outside the lung keeps E whatever it holds
    error = np.ones(hu.shape, np.float32)
    out, done = suppress_vessels(error, hu, lung, spacing)
    assert done == "applied"
    assert np.median(out[parts["end-on vessel"]]) < 0.05 and np.median(out[parts["in-plane vessel"]]) < 0.05
    centre = (20, int(round(50 / 0.8)), int(round(55 / 0.8)))
    assert out[centre] > 0.9 and np.median(out[parts["ball"]]) > 0.5
    background = ~(parts["end-on vessel"] | parts["in-plane vessel"] | parts["ball"])
    assert np.median(out[background & lung]) == 1.0 and (out[:, :, :4] == 1.0).all()
    assert (out <= error).all()


def test_a_single_slice_is_left_as_it_is_and_says_why():
    """In one slice an end-on vessel and a small nodule are both circles: the filter would call both tubes."""
    hu, _ = _phantom((0.8, 0.8, 2.0))
    error = np.ones(hu.shape, np.float32)[20:21]
    out, done = suppress_vessels(error, hu[20:21], np.ones((1,) + hu.shape[1:], bool), (0.8, 0.8, 2.0))
    assert out is error and done.startswith("skipped") and f"{MIN_EXTENT_MM:.0f} mm" in done


def test_detection_with_vessel_suppression_lowers_e_only_inside_the_lung(data_dir, tiny_checkpoint):
    from SACDiffLib.checkpoint import load_checkpoint
    from SACDiffLib.config import derive
    from SACDiffLib.detect import detect_volume
    from SACDiffLib.experiments.validate import parse_settings

    cfg, model, diffusion, _ = load_checkpoint(tiny_checkpoint)
    runs = {}
    for on in (False, True):
        run_cfg = derive(cfg, detect={"steps": 5, "ensemble": 2, "vessel_suppression": on})
        runs[on] = detect_volume(data_dir / "ct" / "sick_ct.nii.gz", model, diffusion, run_cfg,
                                 lung_path=data_dir / "ct" / "sick_lung.nii.gz")
    plain, suppressed = runs[False], runs[True]
    lung = plain.lung > 0
    assert suppressed.facts["vessel_suppression"] == "applied" and "vessel_suppression" not in plain.facts
    assert np.array_equal(suppressed.error[~lung], plain.error[~lung])
    assert (suppressed.error <= plain.error + 1e-7).all() and suppressed.error[lung].sum() < plain.error[lung].sum()
    assert parse_settings("100x10x3v") == [{"steps": 100, "sampling_steps": 10, "ensemble": 3,
                                            "vessel_suppression": True}]


@pytest.mark.parametrize("flag, value", [("--vessel-suppression", True), ("--no-vessel-suppression", False)])
def test_the_flag_sets_the_setting(flag, value):
    import argparse

    from SACDiffLib.cli import _add_detect_options
    from SACDiffLib.config import detect_overrides

    parser = argparse.ArgumentParser()
    _add_detect_options(parser)
    assert detect_overrides(parser.parse_args([flag]))["vessel_suppression"] is value
