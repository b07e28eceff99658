"""The learned lung mask (lungnet.py): synthetic pathology keeps the label, edge refinement and completion on
hand-made masks, resumable training, refusal of scans without lungs; the shipped network against the shared data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from conftest import to_image
from SACDiffLib.errors import SACDiffError
from SACDiffLib.lungnet import (LungNetConfig, _hu_units, complete_lung, learned_lungs, load_lungnet, read_lungnet,
                                refine_edges, synthetic_pathology, train_lungnet)

TINY = LungNetConfig(image_size=64, channels=(8, 16))


def _disc(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_synthetic_pathology_changes_only_the_lung_and_densifies_it():
    cfg = LungNetConfig()
    lung = _disc((128, 128), 64, 64, 40)
    stack = np.where(lung, -0.6, 0.2).astype(np.float32)[None].repeat(3, 0)  # lung ≈ −700 HU units, body denser
    changed = np.zeros(lung.shape, bool)
    for seed in range(20):
        out = synthetic_pathology(stack, lung, np.random.default_rng(seed), cfg, pixel_mm=1.4)
        diff = np.abs(out - stack).max(0) > 1e-4
        # lesions are drawn into the lung; only their soft (partial-volume) edge may reach a pixel or two outside
        assert not (diff & ~_disc((128, 128), 64, 64, 43)).any()
        changed |= diff
        assert np.isfinite(out).all() and out.min() >= -1.01 and out.max() <= 1.01
    assert changed[lung].mean() > 0.3  # over many draws, much of the lung, the pleural rim included
    rim = lung & ~_disc((128, 128), 64, 64, 36)
    assert changed[rim].mean() > 0.3


def test_whole_lung_pathology_densifies_most_of_the_chosen_lung_only():
    """The white-out kind: one lung's whole cross-section turns dense (a thin aerated core at most) while the
    other lung is untouched unless another lesion lands there; the label is not changed by the function."""
    cfg = LungNetConfig()
    right, left = _disc((128, 128), 64, 36, 22), _disc((128, 128), 64, 92, 22)
    lung = right | left
    stack = np.where(lung, _hu_units(-850.0, cfg), _hu_units(40.0, cfg)).astype(np.float32)[None].repeat(3, 0)
    dense = []
    for seed in range(12):
        out = synthetic_pathology(stack, lung, np.random.default_rng(seed), cfg, pixel_mm=1.4, kinds=("whole",))
        denser = out[0] > _hu_units(-600.0, cfg)
        dense.append(max(denser[right].mean(), denser[left].mean()))
    assert np.median(dense) > 0.5  # most of one lung's section is consolidated or ground glass


def test_gravity_gradient_runs_from_ground_glass_in_front_to_consolidation_behind():
    """The front row of the lesion gets a ground-glass value, the back row a consolidation value, monotone between
    (the first version drew the front value twice, so its back row landed anywhere in about −410…+420 HU)."""
    from SACDiffLib.lungnet import gravity_target

    yy, _ = np.mgrid[:64, :64]
    region = _disc((64, 64), 32, 32, 20)
    for seed in range(50):
        target = gravity_target(region, yy, np.random.default_rng(seed))
        column = target[12:53, 32]  # rows 12 (front) … 52 (back) of the disc
        assert -700 <= column[0] <= -350 and -60 <= column[-1] <= 70
        assert np.all(np.diff(column) >= 0)


def test_refine_edges_takes_air_at_the_edge_and_keeps_dense_lung_inside():
    hu = np.full((1, 64, 64), 40.0, np.float32)
    air_lung = _disc((64, 64), 32, 32, 20)
    hu[0][air_lung] = -850.0
    consolidation = _disc((64, 64), 32, 32, 8)  # dense, well inside the network's mask
    hu[0][consolidation] = 30.0
    learned = _disc((64, 64), 32, 32, 22)[None]  # the network's edge 2 px too far out
    image = to_image(hu, spacing=(1.0, 1.0, 2.0))
    out = refine_edges(hu, learned, image, inward_mm=3.0)[0]
    assert out[consolidation].all()  # dense but inside: kept
    assert not out[~air_lung].any()  # the overshoot into the soft tissue is gone
    assert out[air_lung].all()
    assert np.array_equal(refine_edges(hu, learned, image)[0], learned[0])  # the default keeps the network's mask


def test_refine_edges_inward_distance_decides_a_dense_rim_at_the_pleura():
    """A 2 mm band of consolidation along the network's own edge (1 mm pixels): 3 mm inward (round three) hands it
    to the threshold, which cuts it; inward 0 (the default) keeps every voxel of the network's mask; inward 1 mm
    keeps the band's inner half (hand-counted rings of a disc's erosion)."""
    hu = np.full((1, 64, 64), 40.0, np.float32)
    lung = _disc((64, 64), 32, 32, 20)
    hu[0][lung] = -850.0
    rim = lung & ~_disc((64, 64), 32, 32, 18)
    hu[0][rim] = 30.0
    image = to_image(hu, spacing=(1.0, 1.0, 2.0))
    cut = refine_edges(hu, lung[None], image, inward_mm=3.0)[0]
    kept = refine_edges(hu, lung[None], image)[0]
    half = refine_edges(hu, lung[None], image, inward_mm=1.0)[0]
    assert not cut[rim].any() and cut[lung & ~rim].all()
    assert np.array_equal(kept, lung)
    inner = ndimage.binary_erosion(lung, ndimage.generate_binary_structure(2, 1), border_value=1)
    assert np.array_equal(half, inner) and half[rim].sum() == (inner & rim).sum() > 0


def test_complete_lung_adds_only_touching_parts_and_never_removes():
    given = np.zeros((1, 32, 32), np.uint8)
    given[0, 8:24, 4:12] = 1
    learned = np.zeros_like(given)
    learned[0, 8:24, 4:16] = 1  # a consolidation beside the given lung
    learned[0, 2:4, 26:30] = 2  # an unrelated blob
    out = complete_lung(given, learned)
    assert (out[given > 0] == given[given > 0]).all()
    assert out[0, 8:24, 12:16].all() and not out[0, 2:4, 26:30].any()


def test_training_resumes_to_the_same_weights(data_dir, tmp_path):
    whole = tmp_path / "whole.pt"
    train_lungnet(data_dir, whole, steps=4, batch_size=2, save_every=0, cfg=TINY, holdout_every=0)
    part = tmp_path / "part.pt"
    train_lungnet(data_dir, part, steps=4, batch_size=2, save_every=0, cfg=TINY, holdout_every=0,
                  progress=lambda f, m: f < 0.5)  # stops after step 2 and saves
    assert read_lungnet(part)["train_state"]["step"] == 2
    train_lungnet(data_dir, part, steps=4, resume=part)
    a, b = read_lungnet(whole)["model"], read_lungnet(part)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    cfg, net, _ = load_lungnet(whole)
    assert cfg == TINY and not net.training


def test_init_starts_from_the_given_weights(data_dir, tmp_path):
    start = tmp_path / "start.pt"
    train_lungnet(data_dir, start, steps=2, batch_size=2, save_every=0, cfg=TINY, holdout_every=0)
    tuned = tmp_path / "tuned.pt"
    train_lungnet(data_dir, tuned, steps=1, batch_size=2, save_every=0, holdout_every=0, lr=1e-12, init=start)
    a, b = read_lungnet(start)["model"], read_lungnet(tuned)
    assert b["train_state"]["settings"]["init"] == "start.pt" and LungNetConfig.from_dict(b["config"]) == TINY
    assert all(torch.allclose(a[k].float(), b["model"][k].float(), atol=1e-6) for k in a)


def test_train_lungmask_names_a_missing_start_file(tmp_path, capsys):
    from SACDiffLib.cli import main

    for flag in ("--init", "--resume"):
        assert main(["train-lungmask", "--data", str(tmp_path), "--out", str(tmp_path / "o.pt"), flag,
                     str(tmp_path / "missing.pt")]) == 2
        err = capsys.readouterr().err
        assert f"{flag} {tmp_path / 'missing.pt'} does not exist" in err and "--lung-method" not in err
    assert not (tmp_path / "o.pt").exists()


def test_a_scan_without_lungs_is_refused(data_dir, tmp_path, monkeypatch):
    from SACDiffLib import lungnet

    model = tmp_path / "m.pt"
    train_lungnet(data_dir, model, steps=1, batch_size=2, save_every=0, cfg=TINY, holdout_every=0)
    hu = np.full((6, 64, 64), 40.0, np.float32)  # soft tissue only: an abdomen-like block
    monkeypatch.setattr(lungnet, "lung_probability", lambda *a, **k: np.zeros(hu.shape, np.float32))
    with pytest.raises(SACDiffError, match="does not look like a chest CT"):
        learned_lungs(hu, to_image(hu), model)


def test_damaged_lung_models_are_refused(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(SACDiffError, match="corrupt"):
        load_lungnet(bad)
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(SACDiffError, match="not a SACDiff lung model"):
        load_lungnet(tmp_path / "other.pt")
    with pytest.raises(SACDiffError, match="does not exist"):
        load_lungnet(tmp_path / "missing.pt")


def test_cli_trains_a_lung_network_and_lungmask_uses_it(data_dir, tmp_path, monkeypatch):
    import SimpleITK as sitk

    from SACDiffLib import lungnet
    from SACDiffLib.cli import main

    model = tmp_path / "lungnet.pt"
    assert main(["train-lungmask", "--data", str(data_dir), "--out", str(model), "--steps", "2",
                 "--batch-size", "2", "--progress", "lines"]) == 0
    assert read_lungnet(model)["train_state"]["step"] == 2
    assert main(["train-lungmask", "--data", str(data_dir), "--out", str(model), "--steps", "2"]) == 2  # exists
    # The network's probability replaced by the case's own lung: the command must give back that lung, split into
    # right (1) and left (2) by the patient's side, through the edge refinement.
    ct_path = data_dir / "ct" / "normal_a_ct.nii.gz"
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "ct" / "normal_a_lung.nii.gz")))
    monkeypatch.setattr(lungnet, "lung_probability", lambda hu, *a, **k: truth.astype(np.float32))
    out = tmp_path / "mask.nii.gz"
    assert main(["lungmask", str(ct_path), "--out", str(out), "--method", "learned", "--lung-model", str(model),
                 "--no-exclude-airways"]) == 0
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert set(np.unique(labels)) == {0, 1, 2}
    assert ((labels > 0) == (truth > 0)).mean() > 0.995
    xs_right = np.argwhere(labels == 1)[:, 2].mean()
    xs_left = np.argwhere(labels == 2)[:, 2].mean()
    assert xs_right < xs_left  # LPS with identity direction: the patient's right at small x


def test_slim_gives_a_half_precision_lung_network_without_optimiser_state(data_dir, tmp_path):
    from SACDiffLib.cli import main

    full = tmp_path / "full.pt"
    train_lungnet(data_dir, full, steps=1, batch_size=2, save_every=0, cfg=TINY, holdout_every=0)
    slim = tmp_path / "slim.pt"
    assert main(["slim", str(full), "--out", str(slim)]) == 0
    payload = read_lungnet(slim)
    assert payload["train_state"] is None and payload["extra"]["stored_dtype"] == "float16"
    assert main(["slim", str(full), "--out", str(tmp_path / "x.pt"), "--lambda", "3"]) == 2  # no such setting
    _, a, _ = load_lungnet(full)
    _, b, _ = load_lungnet(slim)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(q, p.half().float(), msg=name)


@pytest.mark.parametrize("argv", [["--medseg"], ["--edges", "3,x"], ["--edges", "3,-1"], ["--edges", "nan"]])
def test_lungmask_eval_refuses_a_bad_edge_comparison_with_one_line(argv, capsys):
    from SACDiffLib.experiments.lungmask_eval import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--data", "nowhere", "--model", "none.pt", "--out", "never.json"] + argv)
    assert exit_info.value.code == 2
    assert "--edges" in capsys.readouterr().err.strip().splitlines()[-1]


def test_lungmask_eval_writes_its_pair_whole_and_replaces_only_its_own(tmp_path, monkeypatch, capsys):
    from SACDiffLib.experiments import lungmask_eval

    monkeypatch.setattr(lungmask_eval, "evaluate_lung_masks", lambda data, model: {"figure": 1.0})
    monkeypatch.setattr(lungmask_eval, "markdown", lambda r: f"figure {r['figure']}\n")
    args = ["--data", str(tmp_path / "data"), "--model", str(tmp_path / "m.pt")]
    out = tmp_path / "figures.json"
    assert lungmask_eval.main(args + ["--out", str(out)]) == 0
    assert json.loads(out.read_text()) == {"written_by": "SACDiff", "figure": 1.0}
    assert out.with_suffix(".md").read_text() == "figure 1.0\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figures.json", "figures.md"]  # no temporary left
    with pytest.raises(SystemExit) as exit_info:  # an existing output needs --overwrite
        lungmask_eval.main(args + ["--out", str(out)])
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err.strip().splitlines()[-1]
    assert lungmask_eval.main(args + ["--out", str(out), "--overwrite"]) == 0  # its own pair: replaced

    theirs = tmp_path / "theirs.json"
    theirs.write_text('{"mine": true}')
    notes = tmp_path / "notes.md"
    notes.write_text("my notes")
    for target in (theirs, tmp_path / "notes.json", tmp_path / "figures.txt"):
        with pytest.raises(SystemExit) as exit_info:
            lungmask_eval.main(args + ["--out", str(target), "--overwrite"])
        assert exit_info.value.code == 2
        assert str(target.with_suffix(".md") if target.name == "notes.json" else target.name) in \
            capsys.readouterr().err.strip().splitlines()[-1]
    assert theirs.read_text() == '{"mine": true}' and notes.read_text() == "my notes"  # never touched
    assert not (tmp_path / "notes.json").exists() and not (tmp_path / "figures.txt").exists()
