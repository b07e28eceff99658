"""The 2.5D model (``ModelConfig.context_slices``, issue 20 item 3): neighbouring slices are jointly noised image
channels. Checked against hand-computed slice indices, the 2D network it is warm-started from (same ε̂ for the
slice at step 0), and a volume whose neighbour slice is changed (the slice's reconstruction must change)."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SACDiffLib import io
from SACDiffLib.checkpoint import build
from SACDiffLib.config import derive, preset
from SACDiffLib.detect import reconstruct_ensemble
from SACDiffLib.train import inflated


def _tiny(context: int):
    return derive(preset("tiny"), model={"context_slices": context})


def test_context_indices_by_hand():
    z = np.array([0, 1, 5, 9])
    got = io.context_indices(z, offset=2, per_side=2, n_slices=10)
    assert [g.tolist() for g in got] == [[0, 1, 5, 9], [0, 0, 3, 7], [2, 3, 7, 9], [0, 0, 1, 5], [4, 5, 9, 9]]
    assert [g.tolist() for g in io.context_indices(z, 1, 0, 10)] == [[0, 1, 5, 9]]
    assert io.neighbour_offset(2.0, 4.0) == 2 and io.neighbour_offset(5.0, 4.0) == 1 and io.neighbour_offset(8.0, 1.0) == 1


def test_model_inputs_stack_the_neighbours_as_channels():
    pre = preset("tiny").preprocess
    hu = np.stack([np.full((20, 20), v, np.float32) for v in (-1000, -800, -600, -400, -200)])
    lung = np.ones(hu.shape, np.uint8)
    x, c = io.model_inputs(hu, lung, pre, np.array([2, 4]), offset=2, context=1)
    assert x.shape == (2, 3, 32, 32) and c.shape == (2, 1, 32, 32)
    middle = x[:, :, 16, 16]
    expected = io.window(np.array([[-600, -1000, -200], [-200, -600, -200]], np.float32), pre)  # z, z−2, z+2 (clamped)
    assert np.allclose(middle.numpy(), expected, atol=1e-6)
    flat, _ = io.model_inputs(hu, lung, pre, np.array([2, 4]))
    assert torch.equal(flat, x[:, :1])  # the 2D input is the stack's first channel


def test_a_2d_network_inflated_to_25d_predicts_the_same_eps_for_the_slice():
    torch.manual_seed(0)
    flat, _ = build(_tiny(0))
    stacked, _ = build(_tiny(1))
    for p in flat.parameters():
        torch.nn.init.normal_(p, std=0.05)
    stacked.load_state_dict(inflated(flat.state_dict(), stacked.state_dict()))
    assert stacked.conv_in.in_channels == 4 and stacked.conv_out.out_channels == 3
    x, c, t = torch.randn(2, 3, 32, 32), torch.ones(2, 1, 32, 32), torch.tensor([3, 70])
    eps = stacked(x, c, t)
    assert torch.allclose(eps[:, :1], flat(x[:, :1], c, t), atol=1e-6)
    assert eps[:, 1:].abs().max() == 0  # a neighbour's ε̂ starts at 0 (its field is independent of the slice's)


def test_noise_channels_are_independent_fields_drawn_like_more_samples():
    _, diffusion = build(preset("tiny"))
    a = diffusion.sample_noise(2, 16, 16, torch.Generator().manual_seed(3), channels=3)
    b = diffusion.sample_noise(6, 16, 16, torch.Generator().manual_seed(3))
    assert a.shape == (2, 3, 16, 16) and torch.equal(a, b.view(2, 3, 16, 16))
    assert not torch.allclose(a[:, 0], a[:, 1])


def test_the_reconstruction_of_a_slice_depends_on_its_neighbours():
    """Same slice, same seed: change only the slice the context reaches, and the slice's members change; change
    a slice beyond its reach, and they do not."""
    torch.manual_seed(1)
    model, diffusion = build(_tiny(1))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    model.eval()
    pre = preset("tiny").preprocess
    rng = np.random.default_rng(0)
    hu = rng.uniform(-900, -700, (7, 32, 32)).astype(np.float32)
    lung = np.ones(hu.shape, np.uint8)
    det = derive(_tiny(1), detect={"steps": 5, "ensemble": 2, "sampling_steps": 3}).detect

    def members(volume):
        x, c = io.model_inputs(volume, lung, pre, np.array([3]), offset=2, context=1)
        return reconstruct_ensemble(model, diffusion, x, c, det)[0]

    base = members(hu)
    assert base.shape == (2, 1, 1, 32, 32) and torch.isfinite(base).all()
    near, far = hu.copy(), hu.copy()
    near[5] += 300  # z + 2: the neighbour
    far[4] += 300  # z + 1: not in the stack
    assert not torch.allclose(members(near), base)
    assert torch.equal(members(far), base)


def test_validation_margins_keep_the_scored_slices_and_their_lesions(tmp_path):
    """A 2.5D validation stacks the real neighbours around each held-out slab, unscored; the scored slices, their
    lesions and truth are those of the 2D validation (same seed)."""
    from SACDiffLib.experiments.phantom import write_phantom_cases
    from SACDiffLib.experiments.validate import holdout_volumes, with_context

    z = np.array([8, 9, 10, 11, 20, 21, 22])
    stacked, scored = with_context(z, 2, 23)
    assert stacked.tolist() == [6, 7, 8, 9, 10, 11, 12, 13, 18, 19, 20, 21, 22, 22, 22]
    assert scored.tolist() == [False] * 2 + [True] * 4 + [False] * 4 + [True] * 3 + [False] * 2
    data = write_phantom_cases(tmp_path / "data", cases=1, kind="covid", size=48, slices=40, seed=2, normals=2)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    flat = holdout_volumes(data, 2, None, tmp_path / "a", seed=0)
    deep = holdout_volumes(data, 2, None, tmp_path / "b", seed=0, context=(1, 4.0))
    for f, d in zip(flat, deep):
        keep = d["scored"]
        assert keep.sum() == len(f["slices"]) < keep.size
        assert np.array_equal(d["truth"][keep], f["truth"]) and np.array_equal(d["clean"][keep], f["clean"])
        assert not d["truth"][~keep].any() and d["clean"][~keep].all()
        ct_f = sitk.GetArrayFromImage(sitk.ReadImage(str(f["ct"])))
        ct_d = sitk.GetArrayFromImage(sitk.ReadImage(str(d["ct"])))
        assert np.array_equal(ct_d[keep], ct_f)


@pytest.mark.parametrize("context", [0, 1])
def test_a_checkpoint_round_trips_its_context(tmp_path, context):
    from SACDiffLib.checkpoint import load_checkpoint, save_checkpoint

    cfg = _tiny(context)
    model, _ = build(cfg)
    save_checkpoint(tmp_path / "m.pt", cfg, model)
    loaded_cfg, loaded, _, _ = load_checkpoint(tmp_path / "m.pt")
    assert loaded_cfg.model.context_slices == context and loaded.conv_out.out_channels == 1 + 2 * context


def test_checkpoints_written_before_the_context_load_as_2d(tmp_path):
    from SACDiffLib.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint

    cfg = _tiny(0)
    save_checkpoint(tmp_path / "m.pt", cfg, build(cfg)[0])
    payload = read_checkpoint(tmp_path / "m.pt")
    for key in ("context_slices", "context_mm"):
        del payload["config"]["model"][key]  # as an older SACDiff wrote it
    torch.save(payload, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt")[0].model.context_slices == 0


def test_train_and_validate_a_25d_model_end_to_end(tmp_path, capsys):
    """`sacdiff train --preset ... --init` of a 2.5D network from a 2D file, then `sacdiff validate` on it: the
    rows exist and the same held-out slices are scored as for the 2D model (their synthetic lesion fraction
    matches); the noise and thick-slice variants score it."""
    from SACDiffLib.cli import main
    from SACDiffLib.experiments.phantom import write_phantom_cases
    from SACDiffLib.train import train

    data = write_phantom_cases(tmp_path / "data", cases=1, kind="covid", size=48, slices=40, seed=2, normals=2)
    flat_cfg = derive(preset("tiny"), train={"steps": 2, "holdout_every": 2})
    train(flat_cfg, data, tmp_path / "flat.pt")
    train(derive(flat_cfg, model={"context_slices": 1}), data, tmp_path / "deep.pt", init=str(tmp_path / "flat.pt"))
    rows = {}
    for name in ("flat", "deep"):
        out = tmp_path / f"val-{name}"
        assert main(["validate", "--data", str(data), "--model", str(tmp_path / f"{name}.pt"), "--out", str(out),
                     "--settings", "5x0x2", "--device", "cpu"]) == 0
        rows[name] = json.loads((out / "validation.json").read_text())["rows"][0]
    assert rows["deep"]["synthetic_lesion_fraction_of_lung"] == rows["flat"]["synthetic_lesion_fraction_of_lung"]
    assert np.isfinite(rows["deep"]["synthetic_voxel_auroc"])
    assert main(["validate", "--data", str(data), "--model", str(tmp_path / "deep.pt"), "--out",
                 str(tmp_path / "val-noise"), "--settings", "5x0x2", "--device", "cpu", "--variants",
                 "noise,thick"]) == 0
    varied = json.loads((tmp_path / "val-noise" / "validation.json").read_text())["rows"]
    assert [r["variant"] for r in varied] == [None, "noise", "thick"]
    assert varied[1]["synthetic_lesion_fraction_of_lung"] == rows["deep"]["synthetic_lesion_fraction_of_lung"]
    assert np.isfinite(varied[2]["synthetic_voxel_auroc"])
    assert all(case.endswith("@thick") for case in varied[2]["per_case"])


def test_thick_pairs_keep_scored_pairs_apart_from_the_context():
    """Hand-made stack: block 0 = 2 context, 5 scored, 2 context slices; block 1 = 2 context, 4 scored, 2 context.
    Pairs start at each block's first scored slice: (2,3), (4,5) scored; (6,7) mixes the odd scored slice with a
    context slice (context); (0,1) and the after-margins are context; block 0's last slice is left over."""
    from SACDiffLib.experiments.validate import context_margin, thick_pairs

    blocks = np.array([0] * 9 + [1] * 8)
    scored = np.array([0, 0, 1, 1, 1, 1, 1, 0, 0] + [0, 0, 1, 1, 1, 1, 0, 0], bool)
    pairs = thick_pairs(blocks, scored)
    assert pairs.tolist() == [[0, 1], [2, 3], [4, 5], [6, 7], [9, 10], [11, 12], [13, 14], [15, 16]]
    assert [bool(scored[p].all()) for p in pairs] == [False, True, True, False, False, True, True, False]
    # margins: 4 mm neighbours on 2 mm slices reach 2 slices, on the 4 mm thick variant 1 pair (2 slices);
    # on 1.5 mm slices 3 slices, but the thick variant's 3 mm pairs reach round(4/3) = 1 pair = 2 slices … and on
    # 1.33 mm slices 3 slices, the thick 2.67 mm pairs round(1.5) = 2 pairs = 4 slices: the larger is stacked
    assert context_margin(2.0, 1, 4.0) == 2 and context_margin(1.5, 1, 4.0) == 3
    assert context_margin(4 / 3, 1, 4.0) == 4 and context_margin(2.0, 0, 4.0) == 0
