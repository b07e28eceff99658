"""Label-free validation: synthetic lesions are where they claim to be, the hold-out split is disjoint from
training, and `sacdiff validate` reports figures that re-derive from its own rows."""

import json
from pathlib import Path

import numpy as np
import pytest

from SACDiffLib.cli import main
from SACDiffLib.data import HOLDOUT_SLAB, holdout_split
from SACDiffLib.experiments.validate import LAMBDAS, synthetic_lesions


def test_holdout_split_takes_every_nth_slab_and_is_disjoint():
    z = np.arange(100, 160)
    train, held = holdout_split(z, 5)
    assert set(train).isdisjoint(held) and sorted(np.r_[train, held]) == list(z)
    slabs = sorted({(i - 100) // HOLDOUT_SLAB for i in held})
    assert slabs == [1, 6]  # slabs 1 and 6 of 8 slices each (60 slices → slabs 0..7)
    assert len(held) == 2 * HOLDOUT_SLAB
    assert holdout_split(z, 0)[1].size == 0


def test_synthetic_lesions_stay_in_the_lung_and_move_hu_towards_their_targets():
    rng = np.random.default_rng(0)
    hu = np.full((96, 96), -850, np.int16)
    hu[:, :20] = 40  # chest wall
    lung = np.zeros((96, 96), bool)
    lung[10:86, 25:90] = True
    out, truth = synthetic_lesions(hu, lung, (1.0, 1.0), rng, count=4)
    assert truth.any() and not (truth & ~lung).any()
    assert np.array_equal(out[~lung], hu[~lung])  # nothing outside the lung changes
    assert out[truth].mean() > -600  # every kind is denser than −850 HU lung
    assert (out[lung & ~truth] >= -850).all()


def test_validate_cli_on_phantoms(tmp_path, tiny_checkpoint):
    from SACDiffLib.experiments.phantom import write_phantom_cases

    data = write_phantom_cases(tmp_path / "data", cases=1, kind="covid", size=48, slices=40, seed=2, normals=2)
    out = tmp_path / "val"
    assert main(["validate", "--data", str(data), "--model", str(tiny_checkpoint), "--out", str(out),
                 "--holdout-every", "2", "--settings", "5x0x2,3x0x1", "--device", "cpu", "--variants", "thick"]) == 0
    result = json.loads((out / "validation.json").read_text())
    assert [(r["setting"], r["variant"]) for r in result["rows"]] == [
        ({"steps": 5, "sampling_steps": 0, "ensemble": 2}, None), ({"steps": 5, "sampling_steps": 0, "ensemble": 2},
                                                                   "thick"),
        ({"steps": 3, "sampling_steps": 0, "ensemble": 1}, None), ({"steps": 3, "sampling_steps": 0, "ensemble": 1},
                                                                   "thick")]
    for row in result["rows"]:  # the model's own λ per case, also in the table
        assert set(row["flagged_percent_at_model_lambda"]) == set(row["per_case"])
        f = row["synthetic_lesion_fraction_of_lung"]  # whole lung flagged: Dice = 2f / (1 + f)
        assert row["synthetic_baseline_dice"] == pytest.approx(2 * f / (1 + f))
    for row in result["rows"]:
        flagged = [row["healthy_flagged_percent"][str(lam)] for lam in LAMBDAS]
        assert all(0 <= f <= 100 for f in flagged)
        worst_case = [max(c["flagged_percent"][str(lam)] for c in row["per_case"].values()) for lam in LAMBDAS]
        ok = [lam for lam, f in zip(LAMBDAS, worst_case) if f <= 1.0]
        assert row["recommended_lambda"] == (min(ok) if ok else None)
        assert 0 <= row["synthetic_voxel_auroc"] <= 1 and 0 <= row["synthetic_oracle_dice"] <= 1
        for case in row["per_case"].values():  # a slice's flagged volume is finite and ≥ 0 (ml, the CT's voxels)
            assert set(case["worst_clean_slice_ml"]) == {str(lam) for lam in LAMBDAS}
            assert all(np.isfinite(v) and v >= 0 for v in case["worst_clean_slice_ml"].values())
    table = (out / "validation.md").read_text()
    assert "recommended λ" in table and "[thick]" in table and "Trivial baseline" in table
    assert "worst clean slice (ml)" in table
    assert main(["validate", "--data", str(data), "--model", str(tiny_checkpoint), "--out", str(out)]) == 2


def test_per_kind_figures_see_a_kind_the_map_misses():
    """A map that lights up ground glass and consolidation but not nodules: the pooled AUROC looks fine, the
    nodule's per-kind AUROC is 0.5 (its voxels score like healthy lung)."""
    from types import SimpleNamespace

    from SACDiffLib.experiments.validate import score_setting

    rng = np.random.default_rng(0)
    shape = (2, 40, 40)
    lung = np.ones(shape, np.uint8)
    kinds = np.zeros(shape, np.uint8)
    kinds[1, 5:25, 5:25] = 1  # ground glass: big
    kinds[1, 28:34, 28:34] = 3  # nodule: small
    truth = kinds > 0
    error = rng.random(shape) * 0.1
    error[kinds == 1] += 1.0
    error[kinds == 3] = rng.random(int((kinds == 3).sum())) * 0.1  # like healthy lung

    class FakeResult(SimpleNamespace):
        pass

    result = FakeResult(lung=lung, error=error, mask=np.zeros(shape, np.uint8))
    import SACDiffLib.experiments.validate as validate_module

    original = validate_module.rethreshold
    def fake_rethreshold(r, lam):
        r.mask = (r.error > 0.5 + lam).astype(np.uint8)
        r.threshold = SimpleNamespace(alpha=0.5 + lam)

    validate_module.rethreshold = fake_rethreshold
    try:
        row = score_setting([(result, {"clean": np.array([True, False]), "truth": truth, "kinds": kinds})],
                            lambdas=(0.0, 1.0))
    finally:
        validate_module.rethreshold = original
    assert row["synthetic_voxel_auroc"] > 0.9
    assert row["per_kind"]["ground-glass"]["voxel_auroc"] == pytest.approx(1.0)
    assert abs(row["per_kind"]["nodule"]["voxel_auroc"] - 0.5) < 0.2


def test_recommended_lambda_keeps_every_case_under_one_percent():
    """Two clean cases of 1000 lung voxels; case a flags 20 voxels at λ 1 (2 %), case b none: pooled 1 %, which
    the pooled rule accepted — the per-case rule needs λ 2, where a flags 5 (0.5 %); the worst clean slice's volume
    in ml by hand."""
    from types import SimpleNamespace

    import SACDiffLib.experiments.validate as validate_module

    shape = (2, 10, 100)  # slice 0 clean, slice 1 a lesion slice
    results = []
    for name, hot in (("a", {1.0: 20, 2.0: 5}), ("b", {})):
        error = np.zeros(shape)
        truth = np.zeros(shape, bool)
        truth[1, :2] = True
        error[1, :2] = 9.0  # the lesion, found at every λ
        flat = error[0].reshape(-1)
        flat[:hot.get(1.0, 0)] = 1.5  # above λ 1 only
        flat[:hot.get(2.0, 0)] = 2.5  # above λ 2 too
        result = SimpleNamespace(lung=np.ones(shape, np.uint8), error=error, mask=np.zeros(shape, np.uint8),
                                 reference=SimpleNamespace(GetSpacing=lambda: (1.5, 1.0, 2.0)))  # 3 mm³ voxels
        results.append((result, {"case": name, "clean": np.array([True, False]), "truth": truth,
                                 "kinds": truth.astype(np.uint8)}))

    def fake_rethreshold(r, lam):
        r.mask = (r.error > lam).astype(np.uint8)
        r.threshold = SimpleNamespace(alpha=lam)

    original = validate_module.rethreshold
    validate_module.rethreshold = fake_rethreshold
    try:
        row = validate_module.score_setting(results, lambdas=(1.0, 2.0, 3.0))
    finally:
        validate_module.rethreshold = original
    assert row["healthy_flagged_percent"]["1.0"] == pytest.approx(1.0)  # 20 of 2000 pooled
    assert row["per_case"]["a"]["flagged_percent"]["1.0"] == pytest.approx(2.0)
    assert row["recommended_lambda"] == 2.0
    assert row["synthetic_dice_at_recommended"] == pytest.approx(1.0)
    # the largest volume flagged on one clean slice: 20 and 5 voxels of 3 mm³ on case a's clean slice (the lesion
    # slice's 20 found voxels are not counted), none on b's
    assert row["per_case"]["a"]["worst_clean_slice_ml"] == pytest.approx({"1.0": 0.060, "2.0": 0.015, "3.0": 0.0})
    assert row["per_case"]["b"]["worst_clean_slice_ml"]["1.0"] == 0.0


def test_best_setting_takes_the_setting_whose_worst_kind_is_found_best():
    """Hand-made rows: the pooled winner (A) misses nodules; B's worst kind is best; C ties B within 0.01 and wins on
    the synthetic Dice; D has no λ that keeps healthy lung ≤ 1 % and never qualifies."""
    from SACDiffLib.experiments.validate import best_setting

    def row(name, kinds, dice, lam=1.0):
        return {"setting": name, "recommended_lambda": lam, "synthetic_dice_at_recommended": dice,
                "per_kind": {k: {"oracle_dice": v} for k, v in zip(("ground-glass", "consolidation", "nodule"), kinds)}}

    a = row("A", (0.8, 0.7, 0.05), 0.6)
    b = row("B", (0.6, 0.6, 0.40), 0.3)
    c = row("C", (0.7, 0.6, 0.395), 0.4)
    d = row("D", (0.9, 0.9, 0.90), 0.9, lam=None)
    assert best_setting([a, b, d])["setting"] == "B"
    assert best_setting([a, b, c, d])["setting"] == "C"
    assert best_setting([d]) is None


def test_solid_3d_nodules_have_a_spheres_volume_and_touch_what_they_claim():
    """On a 16-slice slab of 1 mm voxels with one vessel: each nodule's truth volume is the sphere's 4/3·π·r³ (within
    the voxelisation), the vessel-touching one lies one voxel or less from the vessel, the pleural one from the
    lung's edge, the free one apart from both; nothing changes outside the lung."""
    from scipy import ndimage

    from SACDiffLib.experiments.validate import solid_nodules_3d

    hu = np.full((16, 96, 96), -850, np.int16)
    lung = np.zeros(hu.shape, bool)
    lung[:, 8:88, 8:88] = True
    hu[~lung] = 40
    hu[:, 30:33, 50:53] = 20  # a vessel along z
    out, truth, placed = solid_nodules_3d(hu, lung, (1.0, 1.0, 1.0), np.random.default_rng(3), count=3)
    assert [p["placement"] for p in placed] == ["free", "vessel", "pleura"]
    assert np.array_equal(out[~lung], hu[~lung])
    labels, n = ndimage.label(truth)
    assert n == 3
    vessel = np.zeros(hu.shape, bool)
    vessel[:, 30:33, 50:53] = True
    to_vessel = ndimage.distance_transform_edt(~vessel)
    to_edge = ndimage.distance_transform_edt(lung)
    for i in range(1, n + 1):
        blob = labels == i
        zc = np.nonzero(blob.any((1, 2)))[0]
        d = max(p["diameter_mm"] for p in placed if abs(p["diameter_mm"] - (zc[-1] - zc[0] + 1)) < 3)
        assert 5.0 <= d <= 15.0  # 5 mm .. the slab's 16 mm less one slice
    volumes = sorted(int((labels == i).sum()) for i in range(1, n + 1))
    expected = sorted(4 / 3 * np.pi * (p["diameter_mm"] / 2) ** 3 for p in placed)
    for v, e in zip(volumes, expected):
        assert abs(v - e) < 0.25 * e + 30
    near_vessel = min(to_vessel[labels == i].min() for i in range(1, n + 1))
    near_edge = min(to_edge[labels == i].min() for i in range(1, n + 1))
    assert near_vessel <= 2.0 and near_edge <= 2.0
    assert out[truth].mean() > -100  # solid: 0..60 HU, less the partial volume at the rim


def test_a_mass_is_a_sphere_through_the_block_off_what_it_must_avoid():
    """A 30-slice block of 1 mm voxels: the mass's voxels (fraction > 0.5) hold 4/3·π·r³ within the voxelisation,
    reach past a 16-slice slab in the middle (into a 2.5D model's context slices), keep off the pixels it must
    avoid, touch the pleura when asked, and change nothing outside the lung."""
    from scipy import ndimage

    from SACDiffLib.experiments.validate import MASS_DIAMETER_MM, solid_mass

    hu = np.full((30, 96, 96), -850, np.int16)
    lung = np.zeros(hu.shape, bool)
    lung[:, 6:90, 6:90] = True
    hu[~lung] = 40
    avoid = np.zeros(hu.shape[1:], bool)
    avoid[:, :48] = True  # the left half holds other lesions
    for seed, placement in enumerate(["free", "pleura"]):
        out, truth, placed = solid_mass(hu, lung, (1.0, 1.0, 1.0), np.random.default_rng(seed), 15, placement, avoid)
        assert placed["placement"] == placement and MASS_DIAMETER_MM[0] <= placed["diameter_mm"] <= MASS_DIAMETER_MM[1]
        r = placed["diameter_mm"] / 2
        assert abs(truth.sum() - 4 / 3 * np.pi * r ** 3) < 0.1 * 4 / 3 * np.pi * r ** 3
        along_z = np.nonzero(truth.any((1, 2)))[0]
        assert along_z[0] < 7 and along_z[-1] > 22  # beyond the slab 7..22: the mass continues into the context
        assert not truth[:, :, :48].any()
        assert np.array_equal(out[~lung], hu[~lung]) and out[truth].mean() > -100
        to_edge = ndimage.distance_transform_edt(lung[15])[truth[15]].min()
        assert (to_edge <= 2.0) == (placement == "pleura")


def test_parse_settings_reads_harmonised_and_shift_tolerant_items():
    from SACDiffLib.errors import SACDiffError
    from SACDiffLib.experiments.validate import parse_settings

    assert parse_settings("100x10x3,250x10x3h9r3s1,250x10x3h4") == [
        {"steps": 100, "sampling_steps": 10, "ensemble": 3},
        {"steps": 250, "sampling_steps": 10, "ensemble": 3, "harmonise_steps": 9, "harmonise_radius": 3,
         "shift_tolerance": 1},
        {"steps": 250, "sampling_steps": 10, "ensemble": 3, "harmonise_steps": 4}]
    assert parse_settings("250x10x3e2m") == [{"steps": 250, "sampling_steps": 10, "ensemble": 3, "error_radius": 2,
                                             "error": "min-of-errors"}]
    assert parse_settings("250x10x3e2p") == [{"steps": 250, "sampling_steps": 10, "ensemble": 3, "error_radius": 2,
                                             "residual_sign": "hyperdense"}]
    with pytest.raises(SACDiffError, match="T_s×steps×K"):
        parse_settings("250x10")


def test_scanner_variants_keep_the_lesions_and_change_the_scanner(tmp_path):
    """noise: the CT's std rises by ≈ 25 HU in flat regions; sharp: an edge overshoots; thick: pairs of slices
    averaged (half the slices, twice the thickness, truth where the pair's mean ≥ 0.5)."""
    import SimpleITK as sitk

    from SACDiffLib import io
    from SACDiffLib.experiments.validate import scanner_variant

    hu = np.full((8, 32, 32), -850, np.int16)
    hu[:, :, :6] = 40
    lung = np.zeros(hu.shape, np.uint8)
    lung[:, 4:28, 8:28] = 1
    truth = np.zeros(hu.shape, bool)
    truth[2:5, 10:14, 10:14] = True
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((1.0, 1.0, 2.0))
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))
    io.write_image(lung, image, tmp_path / "lung.nii.gz")
    vol = {"case": "c", "ct": tmp_path / "ct.nii.gz", "lung": tmp_path / "lung.nii.gz", "truth": truth,
           "kinds": truth.astype(np.uint8), "clean": np.array([True] * 4 + [False] * 4), "slices": list(range(8))}
    rng = np.random.default_rng(0)
    noisy = sitk.GetArrayFromImage(sitk.ReadImage(str(scanner_variant(vol, "noise", tmp_path, rng)["ct"])))
    assert abs(noisy[:, 10:20, 12:20].std() - 25) < 3
    sharp = sitk.GetArrayFromImage(sitk.ReadImage(str(scanner_variant(vol, "sharp", tmp_path, rng)["ct"])))
    assert sharp[0, 16, 5] > 40 and sharp[0, 16, 6] < -850  # overshoot on both sides of the chest-wall edge
    thick = scanner_variant(vol, "thick", tmp_path, rng)
    image = sitk.ReadImage(str(thick["ct"]))
    assert image.GetSize()[2] == 4 and image.GetSpacing()[2] == 4.0
    assert thick["truth"].shape == (4, 32, 32) and thick["truth"][1].any() and not thick["truth"][3].any()
    assert thick["clean"].tolist() == [True, True, False, False]
    eight = scanner_variant(vol, "8bit", tmp_path, rng)
    assert sitk.ReadImage(str(eight["ct"])).GetSize() == image.GetSize()[:2] + (8,)
    # crop: lung rows 4–27, columns 8–27, 5 mm (5 px) of margin, clipped at the image's edge → rows 0–31 (32),
    # columns 3–31 (29); every lesion voxel and the lung kept
    crop = scanner_variant(vol, "crop", tmp_path, rng)
    cropped = sitk.GetArrayFromImage(sitk.ReadImage(str(crop["ct"])))
    assert cropped.shape == (8, 32, 29) and crop["truth"].shape == cropped.shape
    assert crop["truth"].sum() == truth.sum() and crop["kinds"].shape == cropped.shape
    assert np.array_equal(cropped, hu[:, :, 3:])
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(crop["lung"]))).sum() == lung.sum()


def test_eight_bit_slice_is_read_back_like_a_medseg_picture():
    """Lung (−850 HU) and soft tissue (+40 HU) are the two anchors of MedSeg's per-image fit, so a flat region of each
    comes back within one grey level (1300 HU / 255 = 5.1 HU) plus JPEG error; bone above the window's top (+150 HU)
    is clipped; a ground-glass patch keeps its contrast; at most 256 grey levels survive."""
    from SACDiffLib.experiments.validate import VARIANT_8BIT_WINDOW_HU, eight_bit_slice

    hu = np.full((64, 64), -850.0, np.float32)
    hu[:, :20] = 40.0  # soft tissue (the larger soft-tissue peak)
    hu[4:12, 4:12] = 700.0  # bone
    hu[30:46, 36:52] = -450.0  # ground glass
    out = eight_bit_slice(hu)
    assert abs(np.median(out[20:28, 26:34]) + 850) <= 6 and abs(np.median(out[30:60, 2:16]) - 40) <= 6
    assert out[6:10, 6:10].max() <= VARIANT_8BIT_WINDOW_HU[1] + 10
    assert abs(np.median(out[34:42, 40:48]) + 450) <= 10
    assert len(np.unique(out)) <= 256


RESULTS = Path(__file__).resolve().parents[1] / "Resources" / "results"


def _results_script(name: str):
    """Resources/results/<name>.py (an experiment script, not a package module)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, RESULTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _alpha_reference():
    return _results_script("alpha_reference")


def _committed_round(number: int) -> tuple[list, list, dict]:
    """A round's three committed ``alpha_reference.py`` files (one run split in processes, as scanned / cropped /
    8-bit): (their paths, their documents, the union of their rows)."""
    paths = [RESULTS / f"alpha-reference-round{number}-{g}.json" for g in ("scanned", "crop", "8bit")]
    documents = [json.loads(path.read_text()) for path in paths]
    rows = {}
    for document in documents:
        rows.update(document["rows"])
    return paths, documents, rows


def test_round15_rule_scores_a_hand_made_case_and_the_committed_round16_rows():
    ref = _alpha_reference()

    def row(flagged_by_case, dice):  # flagged % per case per λ, synthetic Dice per λ
        return {"per_case": {c: {"flagged_percent": f} for c, f in flagged_by_case.items()},
                "synthetic_dice": dice, "vessel_flagged_percent": {"8.0": 3.0, "12.0": 1.0},
                "healthy_error": 0.01, "per_kind": {"mass": {"oracle_dice": 0.2}}}

    rows = {  # λ 8: case b of the crop group flags 1.2 % → λ* 12; score = the lower Dice at 12 (0.5, not 0.7)
        "as scanned / shell5": row({"a": {"8.0": 0.5, "12.0": 0.2}, "b": {"8.0": 0.9, "12.0": 0.3}},
                                   {"8.0": 0.8, "12.0": 0.7}),
        "crop / shell5": row({"a": {"8.0": 0.4, "12.0": 0.1}, "b": {"8.0": 1.2, "12.0": 1.0}},
                             {"8.0": 0.6, "12.0": 0.5}),
        "as scanned / body": row({"a": {"8.0": 2.0, "12.0": 1.5}}, {"8.0": 0.9, "12.0": 0.8}),
    }
    scores = ref.rule_scores(rows)
    assert scores["shell5"]["lambda_star"] == 12.0 and scores["shell5"]["score"] == 0.5
    assert scores["body"]["lambda_star"] is None and "lung" not in scores
    # the committed round-16 rows give the figures map-candidates.md reports (shell λ* 12, score 0.580)
    shipped = ref.rule_scores(json.loads((RESULTS / "alpha-reference-round16.json").read_text())["rows"])
    assert shipped["shell5"]["lambda_star"] == 12.0 and round(shipped["shell5"]["score"], 3) == 0.580
    assert round(shipped["body"]["score"], 3) == 0.467 and round(shipped["lung"]["score"], 3) == 0.474


def test_round17_files_score_together_and_a_combined_run_is_not_mixed_with_a_plain_one(tmp_path, capsys):
    """The three committed round-17 files (one run split in processes) give the decision map-candidates.md reports
    (shell λ* 8, score 0.599); a file of round 23's combined map (``--deep``) is another run and is refused beside
    them; ``--open-deep`` without ``--deep`` is refused before any work."""
    ref = _alpha_reference()
    parts, _, rows = _committed_round(17)
    decided = ref.rule_scores(rows)
    assert decided["shell5"]["lambda_star"] == 8.0 and round(decided["shell5"]["score"], 3) == 0.599
    assert ref.score_files([str(p) for p in parts]) == 0
    assert "shell5: λ* 8, score 0.599" in capsys.readouterr().out
    combined = json.loads(parts[1].read_text())
    combined.update(deep={"steps": 250, "sampling_steps": 10, "ensemble": 3, "error_radius": 2}, open_deep_mm=6.0)
    (tmp_path / "combined-crop.json").write_text(json.dumps(combined))
    with pytest.raises(SystemExit, match="different models, settings or seeds"):
        ref.score_files([str(parts[0]), str(tmp_path / "combined-crop.json")])
    with pytest.raises(SystemExit):
        ref.main(["data", str(tmp_path / "x.json"), "100x10x3", "--open-deep", "6"])
    assert "give --deep SETTING too" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ref.main(["data", str(tmp_path / "x.json"), "100x10x3", "--deep", "250x10x3e2", "--open-deep", "-3"])
    assert "must be a diameter in mm ≥ 0" in capsys.readouterr().err and not (tmp_path / "x.json").exists()


def test_round28_rule_lets_only_fit_regions_win_on_the_committed_round25_rows(capsys):
    """Round 28 (map-candidates.md): on round 25's committed rows the lung scores highest (0.627) but is unfit to set
    α (round 27), so the shell wins (λ* 16, 0.595) — the figures the solid-lesions profile takes; a hand-made case
    with no fit λ* has no winner."""
    ref = _alpha_reference()
    parts, _, rows = _committed_round(25)
    scores = ref.rule_scores(rows)
    assert max(scores, key=lambda r: scores[r]["score"]) == "lung" and round(scores["lung"]["score"], 3) == 0.627
    assert ref.best_fit_region(scores) == "shell5"
    assert scores["shell5"]["lambda_star"] == 16.0 and round(scores["shell5"]["score"], 3) == 0.595
    assert ref.score_files([str(p) for p in parts]) == 0
    out = capsys.readouterr().out
    assert "lung: λ* 24, score 0.627" in out and "unfit to set α" in out and "best fit region: shell5" in out
    assert ref.best_fit_region({"body": {"lambda_star": None}, "lung": {"lambda_star": 24.0, "score": 0.9}}) is None


def test_round26_rule_both_parts_hold_on_the_committed_rows():
    """Round 26's rule (map-candidates.md) on its committed files: (a) the best fit region's score ≥ 0.599 − 0.01
    (shell, λ* 8, 0.610) and (b) the 8-bit group's ground-glass oracle Dice on the shell row > 0.544 + 0.02 (0.575)."""
    ref = _alpha_reference()
    _, _, rows = _committed_round(26)
    scores = ref.rule_scores(rows)
    best = ref.best_fit_region(scores)
    assert best == "shell5" and scores[best]["lambda_star"] == 8.0 and round(scores[best]["score"], 3) == 0.610
    assert scores[best]["score"] >= 0.599 - 0.01
    ground_glass = rows["8bit / shell5"]["per_kind"]["ground-glass"]["oracle_dice"]
    assert round(ground_glass, 3) == 0.575 and ground_glass > 0.544 + 0.02


def test_the_solid_lesions_profile_is_round_29s_pick_on_its_committed_rows():
    """The profile's α region and λ (config.DETECT_PROFILES) are what round 28's rule picks from round 29's committed
    rows (the two-chain map on the shipped weights): the best fit region, at its λ*; and the deep chain those rows
    were made with is the profile's."""
    from SACDiffLib.config import DETECT_PROFILES

    ref = _alpha_reference()
    _, documents, rows = _committed_round(29)
    deep = {json.dumps([document["deep"], document["open_deep_mm"]], sort_keys=True) for document in documents}
    scores = ref.rule_scores(rows)
    best = ref.best_fit_region(scores)
    profile = DETECT_PROFILES["solid-lesions"]
    assert {"shell5": "lung-shell", "body": "body"}[best] == profile["background"]
    assert scores[best]["lambda_star"] == profile["lam"] == 16.0 and round(scores[best]["score"], 3) == 0.597
    (chain, opening), = [json.loads(d) for d in deep]
    assert (chain["steps"], chain["sampling_steps"], chain["ensemble"], chain.get("error_radius"), opening) == (
        profile["deep_steps"], profile["deep_sampling_steps"], 3, profile["deep_error_radius"],
        profile["deep_opening_mm"])


def test_diffuse_ground_glass_covers_the_asked_share_of_each_slices_lung_and_only_lung():
    """Round 27's drawing (Resources/results/diffuse_extent.py): on every slice with lung, the asked share of its lung
    (to a pixel per slice, the quantile's ties aside), nothing outside the lung, HU pulled towards −450 by 0.75 in the
    patch's interior (closed form), untouched elsewhere; the same seed draws the same patch."""
    script = _results_script("diffuse_extent")
    rng = np.random.default_rng(0)
    hu = np.full((4, 40, 50), -850, np.int16)
    hu[:, :, :5] = 40  # body outside the lung
    lung = np.zeros(hu.shape, np.uint8)
    lung[:3, 5:35, 8:45] = 1  # the last slice has no lung
    out, region = script.diffuse_ground_glass(hu, lung, (2.0, 0.7, 0.7), 0.4, rng)
    for z in range(3):
        assert abs(region[z].sum() - 0.4 * lung[z].sum()) <= 1
    assert not region[3].any() and not region[lung == 0].any()
    assert (out[lung == 0] == hu[lung == 0]).all()
    core = _interior(region)
    assert core.any() and np.all(np.abs(out[core] - (-850 + 0.75 * (-450 + 850))) <= 1)
    again, region_again = script.diffuse_ground_glass(hu, lung, (2.0, 0.7, 0.7), 0.4, np.random.default_rng(0))
    assert np.array_equal(region, region_again) and np.array_equal(out, again)


def _interior(region):
    """Pixels of ``region`` three pixels inside it in-plane (where the one-pixel softened edge weighs exactly 1)."""
    from scipy import ndimage

    return np.stack([ndimage.binary_erosion(plane, iterations=4) for plane in region])
