"""Train a tiny model on two synthetic volumes, detect on a third: outputs, geometry, determinism, batching."""

import dataclasses
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SACDiffLib.checkpoint import load_checkpoint
from SACDiffLib.config import DetectConfig, derive
from SACDiffLib.errors import SACDiffError
from SACDiffLib.detect import (detect_volume, error_maps, harmonised_x0, network_dtype, reconstruct_ensemble,
                               tolerant_residual)
from SACDiffLib.postprocess import rethreshold
from SACDiffLib.outputs import FILES, load_run, write_run


def _members(net, diffusion, x, c, steps, k, seed=0, batch_size=0, sampling_steps=0, **options):
    """``reconstruct_ensemble`` with these detection settings: (members, stats). float32 on every CPU (``auto`` is
    bf16 on one with AMX): these tests compare against float32 references computed here."""
    det = DetectConfig(steps=steps, ensemble=k, seed=seed, batch_size=batch_size, sampling_steps=sampling_steps,
                       precision="fp32")
    return reconstruct_ensemble(net, diffusion, x, c, det, **options)


def _detect(data_dir, ckpt, **overrides):
    cfg, model, diffusion, _ = load_checkpoint(ckpt)
    cfg = derive(cfg, detect=overrides)
    return detect_volume(data_dir / "ct" / "sick_ct.nii.gz", model, diffusion, cfg,
                         lung_path=data_dir / "ct" / "sick_lung.nii.gz")


def test_detection_writes_every_output_with_the_ct_geometry(data_dir, tiny_checkpoint, tmp_path):
    result = _detect(data_dir, tiny_checkpoint)
    out = write_run(result, tmp_path / "run")
    assert sorted(p.name for p in out.iterdir()) == sorted([*FILES.values(), ".sacdiff-output"])
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


def _per_chunk_reference(model, diffusion, x, cond, steps, k, seed, chunk, sampling_steps=0):
    """Detection's loop before the noise was drawn once per volume (kept here as the reference): every chunk of
    slices re-seeds the generator, draws every (member, step) field again and runs the whole chain on its own."""
    s, _, h, w = x.shape
    model = model.to(memory_format=torch.channels_last)  # detection's layout (detect.prepare_model)
    out = []
    for start in range(0, s, chunk):
        n = min(chunk, s - start)
        g = torch.Generator().manual_seed(seed)

        def noise(_t, n=n, g=g):
            return diffusion.sample_noise(k, h, w, g).unsqueeze(1).expand(k, n, 1, h, w).reshape(k * n, 1, h, w)

        def flat(v, n=n, start=start):
            return v[start:start + n].unsqueeze(0).expand(k, n, 1, h, w).reshape(k * n, 1, h, w)

        def eps(x_t, c, t):
            return model(x_t.contiguous(memory_format=torch.channels_last), c, t)

        with torch.inference_mode():
            recon = diffusion.partial_chain(eps, flat(x), flat(cond), steps, noise, None, sampling_steps)
        out.append(recon.view(k, n, 1, h, w))
    return torch.cat(out, 1)


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_noise_drawn_once_per_volume_is_byte_identical_to_the_per_chunk_path(tiny_checkpoint, chunk):
    cfg, model, diffusion, _ = load_checkpoint(tiny_checkpoint)
    x = torch.rand(5, 1, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    c = (torch.rand(5, 1, 32, 32, generator=torch.Generator().manual_seed(3)) > 0.3).float()
    expected = _per_chunk_reference(model, diffusion, x, c, 6, 3, seed=7, chunk=chunk, sampling_steps=4)
    got, _ = _members(model, diffusion, x, c, 6, 3, seed=7, batch_size=chunk, sampling_steps=4)
    assert torch.equal(got, expected)


class _PerPixelNet(torch.nn.Module):
    """A stand-in ε-network whose output for one image cannot depend on the batch (elementwise only), so any
    difference between chunk sizes would come from the noise or the updates."""

    def forward(self, x, c, t):
        return torch.tanh(0.7 * x + 0.2 * c) * (t.float() / 10).view(-1, 1, 1, 1)


def test_noise_and_updates_do_not_depend_on_the_chunk_size_byte_for_byte(tiny_checkpoint):
    _, _, diffusion, _ = load_checkpoint(tiny_checkpoint)
    x = torch.rand(7, 1, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    c = torch.ones_like(x)
    runs = [_members(_PerPixelNet(), diffusion, x, c, 8, 2, seed=1, batch_size=b)[0] for b in (1, 3, 7)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def test_each_field_is_drawn_once_per_volume_whatever_the_chunks(tiny_checkpoint, monkeypatch):
    from SACDiffLib.diffusion import Diffusion

    _, model, diffusion, _ = load_checkpoint(tiny_checkpoint)
    calls = []
    draw = diffusion.sample_noise
    monkeypatch.setattr(diffusion, "sample_noise", lambda n, *a, **kw: calls.append(n) or draw(n, *a, **kw))
    x = torch.rand(6, 1, 32, 32) * 2 - 1
    _members(model, diffusion, x, torch.ones_like(x), 9, 3, seed=0, batch_size=2, sampling_steps=5)
    # T_s's forward field plus one z per reverse step that lands on t > 0, each K fields at once
    assert calls == [3] * (len(Diffusion.sampling_timesteps(9, 5)) - 1)


def test_every_slice_sees_the_same_noise_and_members_differ(tiny_checkpoint):
    cfg, model, diffusion, _ = load_checkpoint(tiny_checkpoint)
    x = torch.full((1, 1, 32, 32), -0.5).expand(4, 1, 32, 32).contiguous()  # four identical slices
    members, _ = _members(model, diffusion, x, torch.ones_like(x), 5, 3, seed=1)
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
    e3, _, _ = error_maps(x, members, "min-of-errors")
    assert torch.allclose(e3, torch.full_like(e3, 1.0))  # min((0−1)², (0−3)²): what no member explains


def test_min_of_errors_forgives_what_one_member_explains():
    """Three members: one reconstructs a bright query pixel in place (a vessel), two paint it out; a second pixel
    (a lesion) every member paints out. The mean of errors scores both, the minimum only the lesion."""
    x = torch.tensor([1.0, 1.0, 0.0]).view(1, 1, 1, 3)
    members = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]).view(3, 1, 1, 1, 3)
    mean, _, _ = error_maps(x, members, "mean-of-errors")
    low, _, _ = error_maps(x, members, "min-of-errors")
    assert mean.flatten().tolist() == pytest.approx([2 / 3, 1.0, 0.0])
    assert low.flatten().tolist() == [0.0, 1.0, 0.0]


def test_shift_tolerant_residual_by_hand():
    """A 1-D edge drawn one pixel off: no error with radius 1, the full step with radius 0; a bright and a dark spot
    absent from the reconstruction keep their signed distance to the neighbourhood's max / min."""
    recon = torch.tensor([0, 0, 0, 1, 1, 1, 1, 0.0]).view(1, 1, 1, 8)
    query = torch.tensor([0, 0, 1, 1, 1, 1, 3, -2.0]).view(1, 1, 1, 8)  # edge one pixel left; spots at 6 and 7
    np.testing.assert_allclose(tolerant_residual(query, recon, 0).flatten().numpy(), [0, 0, 1, 0, 0, 0, 2, -2])
    # radius 1: x[2] = 1 lies within [min, max] of recon[1..3] = [0, 1] → 0; x[6] = 3 > max(recon[5..7]) = 1 → 2;
    # x[7] = −2 < min(recon[6..7]) = 0 → −2 (hypodense: kept, signed)
    np.testing.assert_allclose(tolerant_residual(query, recon, 1).flatten().numpy(), [0, 0, 0, 0, 0, 0, 2, -2])
    e, _, _ = error_maps(query, recon.unsqueeze(0), "mean-of-errors", shift_tolerance=1)
    np.testing.assert_allclose(e.flatten().numpy(), [0, 0, 0, 0, 0, 0, 4, 4])


def test_error_radius_by_hand():
    """The signed residual's 3-pixel mean before squaring: a vessel the reconstruction blurred (mass kept) scores 0
    at its centre and 1/81 beside it; a 5-pixel lesion it removed keeps its full contrast at its core; the window is
    clipped at the image's edge (divided by the pixels inside)."""
    recon = torch.tensor([0, 0, 1 / 3, 1 / 3, 1 / 3, 0, 0, 0]).view(1, 1, 1, 8)
    vessel = torch.tensor([0, 0, 0, 1.0, 0, 0, 0, 0]).view(1, 1, 1, 8)  # residual [0, 0, −⅓, ⅔, −⅓, 0, 0, 0]
    e, _, _ = error_maps(vessel, recon.unsqueeze(0), "mean-of-errors", error_radius=1)
    np.testing.assert_allclose(e.flatten().numpy(), np.array([0, 1, 1, 0, 1, 1, 0, 0]) / 81, atol=1e-7)
    plain, _, _ = error_maps(vessel, recon.unsqueeze(0), "mean-of-errors")
    assert float(plain.max()) == pytest.approx(4 / 9)
    lesion = torch.tensor([0, 0, 1, 1, 1, 1, 1, 0.0]).view(1, 1, 1, 8)
    e, _, _ = error_maps(lesion, torch.zeros(1, 1, 1, 1, 8), "error-of-mean", error_radius=1)
    np.testing.assert_allclose(e.flatten().numpy(), np.array([0, 1 / 3, 2 / 3, 1, 1, 1, 2 / 3, 1 / 2]) ** 2,
                               atol=1e-7)
    dark = -lesion  # hypodense (emphysema, a cyst): the same score, not dropped
    e_dark, _, _ = error_maps(dark, torch.zeros(1, 1, 1, 1, 8), "error-of-mean", error_radius=1)
    assert torch.allclose(e, e_dark)


def test_hyperdense_residual_sign_by_hand():
    """Only x brighter than x̂ counts (after the error radius's mean): a mass the reconstruction removed keeps its
    score, a vessel it invented (x darker) scores 0; per member, before the members' mean."""
    x = torch.tensor([0.5, 0.0, 0.0, 0.0]).view(1, 1, 1, 4)
    members = torch.tensor([[0.0, 0.5, 0.0, 0.0], [0.0, 0.0, -0.3, 0.0]]).view(2, 1, 1, 1, 4)
    both, _, _ = error_maps(x, members, "mean-of-errors")
    hyper, _, _ = error_maps(x, members, "mean-of-errors", residual_sign="hyperdense")
    np.testing.assert_allclose(both.flatten().numpy(), [0.25, 0.125, 0.045, 0], atol=1e-7)
    np.testing.assert_allclose(hyper.flatten().numpy(), [0.25, 0, 0.045, 0], atol=1e-7)
    # mean of [0.5, −0.5, 0] on pixel 1 (window clipped at the edge) is 0 for the first member's residual
    hyper_r, _, _ = error_maps(x, members[:1], "mean-of-errors", error_radius=1, residual_sign="hyperdense")
    np.testing.assert_allclose(hyper_r.flatten().numpy(), [0, 0, 0, 0], atol=1e-7)
    with pytest.raises(SACDiffError, match="residual sign 'up' unknown"):
        error_maps(x, members, residual_sign="up")


def test_harmonised_blend_against_a_numpy_reference():
    """w = clamp(z / 4 − 1, 0, 1), z = (r̃ − median) / (1.4826 · MAD), r̃ = |3×3 mean of (x̂₀ − x)|, grown by a 5×5 max filter, computed
    here with scipy over the lung; 1 outside the lung (x̂₀ kept); x̂₀ʰ = w x̂₀ + (1 − w) x."""
    from scipy import ndimage

    from SACDiffLib.detect import HARMONISE_GROW, HARMONISE_SCALES

    rng = np.random.default_rng(0)
    query = rng.normal(0, 0.1, (1, 1, 32, 32))
    x0_hat = query + rng.normal(0, 0.02, query.shape)
    x0_hat[..., 10:16, 12:18] += 0.8  # a lesion the deep step removed
    lung = np.zeros(query.shape, bool)
    lung[..., 4:28, 4:28] = True
    out = harmonised_x0(torch.tensor(x0_hat, dtype=torch.float32), torch.tensor(query, dtype=torch.float32),
                        torch.tensor(lung)).numpy()

    d = (x0_hat - query)[0, 0].astype(np.float32)
    counts = ndimage.uniform_filter(np.ones_like(d), 3, mode="constant")
    r_smooth = np.abs(ndimage.uniform_filter(d, 3, mode="constant") / counts)  # |mean of the signed difference|
    values = r_smooth[lung[0, 0]]
    med = np.median(values)
    scale = 1.4826 * np.median(np.abs(values - med))
    w = np.clip((r_smooth - med) / scale / HARMONISE_SCALES - 1, 0, 1)
    w = ndimage.maximum_filter(w, 2 * HARMONISE_GROW + 1, mode="constant", cval=0)
    w = np.where(lung[0, 0], w, 1.0)
    expected = w * x0_hat[0, 0] + (1 - w) * query[0, 0]
    np.testing.assert_allclose(out[0, 0], expected, atol=2e-4)
    assert np.allclose(out[0, 0, 12, 14], x0_hat[0, 0, 12, 14], atol=1e-5)  # the lesion: x̂₀ kept
    assert np.array_equal(out[~lung], x0_hat[~lung].astype(np.float32))  # outside the lung: untouched


def test_harmonisation_weight_ignores_a_blurred_vessel_but_not_a_removed_lesion():
    """The signed mean over 7×7 pixels: a thin bright line that x̂₀ blurs (same mass, spread) gets weight ≈ 0 — the
    query's vessel is carried on; a blob that x̂₀ removed gets weight 1 — x̂₀ is kept."""
    from scipy import ndimage

    query = np.zeros((1, 1, 48, 48), np.float32)
    query[..., 10:38, 12] = 1.0  # a vessel, one pixel wide
    query[..., 28:36, 28:36] = 1.0  # a lesion
    x0_hat = ndimage.uniform_filter(query[0, 0] * (np.arange(48)[None, :] < 20), (1, 3))[None, None]  # vessel blurred,
    rng = np.random.default_rng(1)  # lesion removed; a little noise so that the lung's MAD is not 0
    x0_hat = (x0_hat + rng.normal(0, 0.01, x0_hat.shape)).astype(np.float32)
    lung = torch.ones((1, 1, 48, 48), dtype=torch.bool)
    out = harmonised_x0(torch.tensor(x0_hat), torch.tensor(query), lung, radius=3).numpy()
    assert abs(out[0, 0, 24, 12] - query[0, 0, 24, 12]) < 0.05  # the query's vessel, sharp
    assert abs(out[0, 0, 32, 32] - x0_hat[0, 0, 32, 32]) < 1e-5  # the lesion stays removed


def test_rethreshold_changes_the_mask_only(data_dir, tiny_checkpoint, tmp_path):
    result = _detect(data_dir, tiny_checkpoint, crf=False)
    write_run(result, tmp_path / "run")
    run = load_run(tmp_path / "run")
    error_before = run.error.copy()
    low = rethreshold(run, -1.0).mask.sum()
    high = rethreshold(run, 3.0).mask.sum()
    assert low > high
    np.testing.assert_array_equal(run.error, error_before)
    assert run.detect.lam == 3.0 and run.threshold.lam == 3.0


@pytest.mark.skipif(not (__import__("conftest").SHARED_DATA / "cases.json").exists(),
                    reason="real CT data (../shared/data) not present")
def test_real_512_ct_keeps_its_geometry(tiny_checkpoint, tmp_path):
    from conftest import SHARED_DATA

    cfg, model, diffusion, _ = load_checkpoint(tiny_checkpoint)
    cfg = derive(cfg, detect={"steps": 2, "ensemble": 1, "crf": False})
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
    q = result.quantification
    assert 1500 < q["lung_ml"] < 9000  # adult lungs


def test_crop_box_covers_the_lung_with_margin_and_fits_the_unet():
    from SACDiffLib.io import crop_box

    cond = torch.zeros(2, 1, 64, 64)
    cond[0, 0, 20:30, 10:15] = 1
    cond[1, 0, 25:41, 40:44] = 1  # union over slices: rows 20..40, cols 10..43
    rows, cols = crop_box(cond, multiple=8, margin=4)
    assert rows.start <= 16 and rows.stop >= 45 and cols.start <= 6 and cols.stop >= 48
    assert (rows.stop - rows.start) % 8 == 0 and (cols.stop - cols.start) % 8 == 0
    assert 0 <= rows.start and rows.stop <= 64 and 0 <= cols.start and cols.stop <= 64
    assert crop_box(torch.zeros(1, 1, 32, 32), 8) == (slice(0, 32), slice(0, 32))


def test_cropped_path_matches_the_plain_path_inside_the_lung(data_dir, tiny_checkpoint):
    """Cropping changes only what the UNet sees at the box border; inside the lung the error map agrees."""
    plain = _detect(data_dir, tiny_checkpoint, crop_to_lung=False, crf=False)
    cropped = _detect(data_dir, tiny_checkpoint, crop_to_lung=True, crf=False)
    assert plain.box == cropped.box  # one definition of the background region
    lung = plain.lung > 0
    diff = np.abs(plain.error[lung] - cropped.error[lung])
    assert np.median(diff) < 1e-3 * max(float(np.median(plain.error[lung])), 1e-6) + 1e-7
    assert diff.max() < 0.05 * float(plain.error[lung].max()) + 1e-6
    both = (plain.mask > 0) | (cropped.mask > 0)
    agree = ((plain.mask > 0) & (cropped.mask > 0)).sum() / max(both.sum(), 1)
    assert agree > 0.9
    assert cropped.facts["processed_voxel_fraction"] <= plain.facts["processed_voxel_fraction"] <= 1.0


def test_cropped_reconstruction_matches_the_uncropped_one_away_from_the_box_border(tiny_checkpoint):
    from SACDiffLib.io import crop_box

    cfg, model, diffusion, _ = load_checkpoint(tiny_checkpoint)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 64, 64, generator=g) * 2 - 1
    c = torch.zeros_like(x)
    c[:, :, 24:40, 20:44] = 1
    box = crop_box(c, cfg.model.size_multiple)
    assert (box[0].stop - box[0].start) < 64 and (box[1].stop - box[1].start) < 64
    full, _ = _members(model, diffusion, x, c, 5, 2, seed=0)
    crop, _ = _members(model, diffusion, x, c, 5, 2, seed=0, box=box)
    inside = (slice(None), slice(None), slice(None), slice(24, 40), slice(20, 44))
    gap = (full[inside] - crop[inside]).abs()
    assert float(gap.mean()) < 0.02 and float(gap.max()) < 0.2  # border effects only reach a few pixels in
    outside = torch.ones(64, 64, dtype=torch.bool)
    outside[box] = False
    torch.testing.assert_close(crop[..., outside], x.unsqueeze(0).expand(2, -1, -1, -1, -1)[..., outside])


class _OOMBelow(torch.nn.Module):
    """Stand-in for a GPU that runs out of memory above ``limit`` images per forward."""

    def __init__(self, model, limit):
        super().__init__()
        self.model, self.limit, self.cfg, self.batches = model, limit, model.cfg, []

    def forward(self, x, c, t):
        self.batches.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return self.model(x, c, t)


def test_out_of_memory_halves_the_chunk_and_gives_the_same_result(tiny_checkpoint):
    cfg, model, diffusion, _ = load_checkpoint(tiny_checkpoint)
    x = torch.rand(6, 1, 32, 32) * 2 - 1
    c = torch.ones_like(x)
    plain, _ = _members(model, diffusion, x, c, 4, 2, seed=0, batch_size=6)
    flaky = _OOMBelow(model, limit=5)  # K = 2: 6 slices → 12 images fail, 3 → 6 fail, 1 → 2 pass... 2 → 4 pass
    retried, stats = _members(flaky, diffusion, x, c, 4, 2, seed=0, batch_size=6)
    assert stats.oom_retries == 2 and stats.chunk_slices == 1
    assert max(b for b in flaky.batches[-4:]) <= 5
    torch.testing.assert_close(retried, plain, rtol=1e-4, atol=1e-5)
    with pytest.raises(torch.OutOfMemoryError):  # nothing left to halve: the error reaches the caller
        _members(_OOMBelow(model, limit=1), diffusion, x, c, 4, 2, seed=0, batch_size=6)


def test_respaced_detection_runs_fewer_network_evaluations(tiny_checkpoint):
    from SACDiffLib.detect import network_evaluations

    cfg, model, diffusion, _ = load_checkpoint(tiny_checkpoint)
    counter = _OOMBelow(model, limit=10**9)
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    _members(counter, diffusion, x, torch.ones_like(x), 10, 2, seed=0, sampling_steps=4)
    assert len(counter.batches) == 4
    paper = DetectConfig(steps=550, ensemble=7, sampling_steps=25)  # the paper's T_s (this tiny model has T = 100)
    assert network_evaluations(paper) == 7 * 25
    assert network_evaluations(dataclasses.replace(paper, sampling_steps=0)) == 7 * 550


def test_deep_chain_is_the_maximum_of_the_first_map_and_the_opened_deep_map(data_dir, tiny_checkpoint):
    """``deep_steps``: E = max(E of the first chain, the deep chain's E opened by the ball), each chain as a detection
    of its own with the same seed computes it; σ and x̄₀ stay the first chain's; both chains' evaluations count."""
    from SACDiffLib.detect import network_evaluations
    from SACDiffLib.postprocess import opened

    common = dict(steps=10, ensemble=2, sampling_steps=5, precision="fp32", seed=3)
    both = _detect(data_dir, tiny_checkpoint, **common, deep_steps=30, deep_sampling_steps=4, deep_error_radius=1,
                   deep_opening_mm=6.0)
    first = _detect(data_dir, tiny_checkpoint, **common)
    deep = _detect(data_dir, tiny_checkpoint, **{**common, "steps": 30, "sampling_steps": 4, "error_radius": 1})
    expected = np.maximum(first.error, opened(deep.error, 6.0, first.reference.GetSpacing()[::-1]))
    np.testing.assert_allclose(both.error, expected, rtol=1e-6, atol=1e-7)
    assert (both.error > first.error).any() and (both.error >= first.error).all()
    np.testing.assert_array_equal(both.uncertainty_hu, first.uncertainty_hu)
    assert network_evaluations(both.detect) == 2 * 5 + 2 * 4
    assert both.facts["network_evaluations"] == 18 * both.processed.size


def test_two_chains_report_progress_by_network_evaluations_and_cancel_in_the_deep_one(data_dir, tiny_checkpoint):
    """The first chain (2 × 5 evaluations) covers 0..10/18 of the bar, the deep one (2 × 4) the rest, its messages
    marked; a cancel during the deep chain stops the detection."""
    from SACDiffLib.errors import Cancelled

    cfg, model, diffusion, _ = load_checkpoint(tiny_checkpoint)
    cfg = derive(cfg, detect=dict(steps=10, ensemble=2, sampling_steps=5, precision="fp32", deep_steps=30,
                                  deep_sampling_steps=4))
    seen = []
    detect_volume(data_dir / "ct" / "sick_ct.nii.gz", model, diffusion, cfg, data_dir / "ct" / "sick_lung.nii.gz",
                  progress=lambda f, m: seen.append((f, m)) or True)
    first = [f for f, m in seen if not m.startswith("deep chain: ")]
    deep = [f for f, m in seen if m.startswith("deep chain: ")]
    assert first and deep and max(first) == pytest.approx(10 / 18) and max(deep) == pytest.approx(1.0)
    assert min(deep) > 10 / 18 and all(b >= a for a, b in zip(first + deep, (first + deep)[1:]))
    with pytest.raises(Cancelled):
        detect_volume(data_dir / "ct" / "sick_ct.nii.gz", model, diffusion, cfg, data_dir / "ct" / "sick_lung.nii.gz",
                      progress=lambda f, m: not m.startswith("deep chain: "))


def test_deep_chain_settings_are_refused_out_of_range(tiny_checkpoint):
    cfg, *_ = load_checkpoint(tiny_checkpoint)  # T = 100
    with pytest.raises(SACDiffError, match="--deep-steps"):
        derive(cfg, detect={"deep_steps": 101})
    with pytest.raises(SACDiffError, match="--deep-sampling-steps"):
        derive(cfg, detect={"deep_steps": 20, "deep_sampling_steps": 21})
    with pytest.raises(SACDiffError, match="must exceed the first chain's 50"):
        derive(cfg, detect={"steps": 50, "deep_steps": 40})
    with pytest.raises(SACDiffError, match="--deep-opening"):
        derive(cfg, detect={"deep_steps": 20, "deep_opening_mm": -1.0})


def test_compiled_network_gives_the_eager_result(tiny_checkpoint):
    """torch.compile (inductor on the CPU here; CUDA graphs on a GPU) must not change detection."""
    cfg, model, diffusion, _ = load_checkpoint(tiny_checkpoint)
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    c = torch.ones_like(x)
    eager, _ = _members(model, diffusion, x, c, 3, 2, seed=0)
    compiled, stats = _members(model, diffusion, x, c, 3, 2, seed=0, compile_model=True)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    assert stats.compiled in (True, False)  # True where a compiler exists; a fallback to eager is allowed, never a failure


def test_precision_chooses_the_network_dtype_per_device(monkeypatch):
    import SACDiffLib.detect as detect

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for amx, on_cpu in ((False, torch.float32), (True, torch.bfloat16)):  # auto: bf16 only where the CPU has AMX
        monkeypatch.setattr(detect, "cpu_has_amx", lambda: amx)
        assert network_dtype("auto", cpu) == on_cpu and network_dtype("auto", cuda) == torch.bfloat16
        assert network_dtype("bf16", cpu) == torch.bfloat16 and network_dtype("fp32", cuda) == torch.float32
        assert network_dtype("fp32", cpu) == torch.float32
    with pytest.raises(SACDiffError, match="precision 'fp16' unknown"):
        network_dtype("fp16", cpu)


def test_bf16_runs_the_network_in_bf16_and_stays_near_the_float32_result(tiny_checkpoint):
    """The autocast reaches the convolutions (a hook sees their dtype) and moves the members by about bf16's
    resolution (8 bits of mantissa: 2⁻⁸ ≈ 0.004 relative), not more; the chain around the network stays float32."""
    cfg, model, diffusion, _ = load_checkpoint(tiny_checkpoint)
    seen = []
    hook = model.conv_in.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    c = torch.ones_like(x)
    runs = {}
    for precision in ("fp32", "bf16"):
        det = DetectConfig(steps=6, ensemble=2, sampling_steps=3, precision=precision)
        seen.clear()
        runs[precision] = reconstruct_ensemble(model, diffusion, x, c, det)
        assert set(seen) == {torch.float32 if precision == "fp32" else torch.bfloat16}
    hook.remove()
    (full, full_stats), (half, half_stats) = runs["fp32"], runs["bf16"]
    assert (full_stats.precision, half_stats.precision) == ("fp32", "bf16")
    assert half.dtype == torch.float32
    difference = (half - full).abs().max().item()
    assert 0 < difference < 0.05
