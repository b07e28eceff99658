"""The command line end to end, and every bad input with its one-line error."""

import json
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import make_chest, to_image
from SACDiffLib.cli import main
from SACDiffLib.config import derive
from SACDiffLib.errors import Cancelled


def run_cli(*args):
    return main([str(a) for a in args])


def test_train_then_detect_then_threshold(data_dir, tmp_path, capsys):
    ckpt = tmp_path / "m.pt"
    assert run_cli("train", "--data", data_dir, "--out", ckpt, "--preset", "tiny", "--steps", 4) == 0
    out = tmp_path / "run"
    assert run_cli("detect", data_dir / "ct" / "sick_ct.nii.gz", "--lung", data_dir / "ct" / "sick_lung.nii.gz",
                   "--model", ckpt, "--out", out, "--no-crf", "--steps", 5, "--ensemble", 2) == 0
    mask_file = out / "anomaly_mask.nii.gz"
    map_bytes = (out / "anomaly_map.nii.gz").read_bytes()
    before = sitk.GetArrayFromImage(sitk.ReadImage(str(mask_file))).sum()
    t0 = time.perf_counter()
    assert run_cli("threshold", out, "--lambda", -2) == 0
    assert time.perf_counter() - t0 < 5  # no model run
    after = sitk.GetArrayFromImage(sitk.ReadImage(str(mask_file))).sum()
    assert after > before
    assert (out / "anomaly_map.nii.gz").read_bytes() == map_bytes
    assert json.loads((out / "report.json").read_text())["lambda"] == -2
    assert "anomaly" in capsys.readouterr().out


def test_detect_without_lung_mask_uses_the_fallback(tiny_checkpoint, data_dir, tmp_path):
    out = tmp_path / "run"
    assert run_cli("detect", data_dir / "ct" / "sick_ct.nii.gz", "--model", tiny_checkpoint, "--out", out,
                   "--steps", 3) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["lung_mask"].startswith("automatic")


def test_lungmask_command(data_dir, tmp_path):
    out = tmp_path / "lung.nrrd"
    assert run_cli("lungmask", data_dir / "ct" / "normal_a_ct.nii.gz", "--out", out) == 0
    assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(out))))) == {0, 1, 2}
    assert run_cli("lungmask", data_dir / "ct" / "normal_a_ct.nii.gz", "--out", out) == 2  # exists


# --- bad inputs: each gets one line naming the problem and the fix ---------------------------------------------


def _write(tmp_path, name, array, **kw):
    path = tmp_path / name
    sitk.WriteImage(to_image(array, **kw) if array.ndim == 3 else sitk.GetImageFromArray(array), str(path))
    return path


def _detect_error(capsys, ct, model, out, *extra):
    code = run_cli("detect", ct, "--model", model, "--out", out, "--steps", 2, *extra)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "error:" in err
    return err


def test_eight_bit_image(tiny_checkpoint, tmp_path, capsys):
    ct = _write(tmp_path, "ct.nii.gz", np.random.default_rng(0).integers(0, 256, (6, 32, 32)).astype(np.uint8))
    assert "8-bit" in _detect_error(capsys, ct, tiny_checkpoint, tmp_path / "o")


def test_two_d_image(tiny_checkpoint, tmp_path, capsys):
    ct = _write(tmp_path, "ct.nii.gz", np.full((32, 32), -1000, np.int16))
    assert "2D" in _detect_error(capsys, ct, tiny_checkpoint, tmp_path / "o")


def test_mask_of_other_geometry(tiny_checkpoint, data_dir, tmp_path, capsys):
    _, labels, _ = make_chest(64, 12)
    mask = _write(tmp_path, "m.nii.gz", labels, spacing=(1.0, 1.0, 2.5))
    err = _detect_error(capsys, data_dir / "ct" / "sick_ct.nii.gz", tiny_checkpoint, tmp_path / "o", "--lung", mask)
    assert "geometry" in err and "spacing" in err


def test_empty_lung_mask(tiny_checkpoint, data_dir, tmp_path, capsys):
    mask = _write(tmp_path, "m.nii.gz", np.zeros((12, 64, 64), np.uint8))
    err = _detect_error(capsys, data_dir / "ct" / "sick_ct.nii.gz", tiny_checkpoint, tmp_path / "o", "--lung", mask)
    assert "empty" in err


def test_nan_voxels(tiny_checkpoint, tmp_path, capsys):
    hu, _, _ = make_chest(32, 6)
    hu[2, 3, 3] = np.nan
    ct = _write(tmp_path, "ct.mha", hu)  # (ITK's NIfTI reader turns NaN into 0; MHA keeps it)
    assert "NaN" in _detect_error(capsys, ct, tiny_checkpoint, tmp_path / "o")


def test_no_lung_slices(tiny_checkpoint, data_dir, tmp_path, capsys):
    mask = np.zeros((12, 64, 64), np.uint8)
    mask[5, 30, 30] = 1  # one voxel: no slice reaches the minimum lung fraction
    path = _write(tmp_path, "m.nii.gz", mask)
    err = _detect_error(capsys, data_dir / "ct" / "sick_ct.nii.gz", tiny_checkpoint, tmp_path / "o", "--lung", path)
    assert "no slice" in err


def test_not_hounsfield(tiny_checkpoint, tmp_path, capsys):
    ct = _write(tmp_path, "ct.nii.gz", np.full((6, 32, 32), 1200, np.int16))
    assert "Hounsfield" in _detect_error(capsys, ct, tiny_checkpoint, tmp_path / "o")


def test_corrupt_checkpoint(data_dir, tmp_path, capsys, tiny_checkpoint):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(tiny_checkpoint.read_bytes()[:1000])  # truncated
    assert "corrupt" in _detect_error(capsys, data_dir / "ct" / "sick_ct.nii.gz", bad, tmp_path / "o")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    assert "corrupt" in _detect_error(capsys, data_dir / "ct" / "sick_ct.nii.gz", junk, tmp_path / "o")


def test_checkpoint_of_another_config(data_dir, tmp_path, capsys, tiny_checkpoint):
    payload = torch.load(tiny_checkpoint, weights_only=True)
    payload["config"]["model"]["attention_heads"] = 4  # a field this version does not know
    other = tmp_path / "other.pt"
    torch.save(payload, other)
    err = _detect_error(capsys, data_dir / "ct" / "sick_ct.nii.gz", other, tmp_path / "o")
    assert "attention_heads" in err and "does not match" in err
    payload = torch.load(tiny_checkpoint, weights_only=True)
    payload["config"]["model"]["channels"] = [8, 16, 32]  # weights of another network
    torch.save(payload, other)
    assert "do not fit" in _detect_error(capsys, data_dir / "ct" / "sick_ct.nii.gz", other, tmp_path / "o")


def test_existing_output_folder_is_refused_unless_overwrite(data_dir, tmp_path, capsys, tiny_checkpoint):
    """--overwrite replaces only what SACDiff wrote: a folder of the user's is never deleted."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = _detect_error(capsys, data_dir / "ct" / "sick_ct.nii.gz", tiny_checkpoint, out)
    assert "--overwrite" in err and (out / "keep.txt").exists()
    assert run_cli("detect", data_dir / "ct" / "sick_ct.nii.gz", "--model", tiny_checkpoint, "--out", out,
                   "--steps", 2, "--overwrite") == 2
    assert "not written by SACDiff" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    run = tmp_path / "run"
    for lam in ("1", "2"):  # a SACDiff run folder is replaced whole
        assert run_cli("detect", data_dir / "ct" / "sick_ct.nii.gz", "--model", tiny_checkpoint, "--out", run,
                       "--steps", 2, "--overwrite", "--lambda", lam) == 0
    assert json.loads((run / "report.json").read_text())["lambda"] == 2.0


def test_interrupted_run_leaves_nothing(data_dir, tmp_path, monkeypatch, tiny_checkpoint, capsys):
    """Cancel in the middle of the reverse chain: no output folder, no temporary folder, inputs untouched."""
    import SACDiffLib.diffusion as diffusion_module

    ct = data_dir / "ct" / "sick_ct.nii.gz"
    before = ct.read_bytes()
    original = diffusion_module.Diffusion.p_step
    calls = {"n": 0}

    def interrupted(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, *a, **k)

    monkeypatch.setattr(diffusion_module.Diffusion, "p_step", interrupted)
    out = tmp_path / "o"
    assert run_cli("detect", ct, "--model", tiny_checkpoint, "--out", out, "--steps", 5) == 130
    assert "cancelled" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".o*"))
    assert ct.read_bytes() == before


def test_progress_callback_can_cancel(data_dir, tiny_checkpoint):
    from SACDiffLib.checkpoint import load_checkpoint
    from SACDiffLib.detect import detect_volume

    cfg, model, diffusion, _ = load_checkpoint(tiny_checkpoint)
    cfg = derive(cfg, detect={"steps": 6})
    seen = []

    def progress(fraction, message):
        seen.append(fraction)
        return fraction < 0.5

    with pytest.raises(Cancelled):
        detect_volume(data_dir / "ct" / "sick_ct.nii.gz", model, diffusion, cfg, device=torch.device("cpu"),
                      progress=progress)
    assert seen == sorted(seen) and 0 < seen[0] < 0.5 <= seen[-1]


def test_missing_inputs(tmp_path, capsys, tiny_checkpoint):
    assert "does not exist" in _detect_error(capsys, tmp_path / "nope.nii.gz", tiny_checkpoint, tmp_path / "o")
    assert run_cli("train", "--data", tmp_path, "--out", tmp_path / "m.pt", "--preset", "tiny") == 2
    assert "cases.json" in capsys.readouterr().err


def test_train_refuses_an_eight_bit_share_outside_0_to_1(data_dir, tmp_path, capsys):
    assert run_cli("train", "--data", data_dir, "--out", tmp_path / "m.pt", "--preset", "tiny", "--eight-bit", 1.5) == 2
    err = capsys.readouterr().err.strip()
    assert "--eight-bit" in err and len(err.splitlines()) == 1 and not (tmp_path / "m.pt").exists()


def test_progress_and_error_lines_follow_the_shared_protocol(data_dir, tiny_checkpoint, tmp_path, capsys):
    from SACDiffLib.protocol import is_error_line, parse_progress

    assert run_cli("detect", data_dir / "ct" / "sick_ct.nii.gz", "--model", tiny_checkpoint, "--out",
                   tmp_path / "o", "--steps", 2, "--progress", "lines") == 0
    fractions = [p[0] for p in map(parse_progress, capsys.readouterr().out.splitlines()) if p is not None]
    assert fractions and all(0 <= f <= 1 for f in fractions) and fractions == sorted(fractions)
    assert run_cli("detect", data_dir / "ct" / "sick_ct.nii.gz", "--model", tmp_path / "none.pt", "--out",
                   tmp_path / "o2") == 2
    assert is_error_line(capsys.readouterr().err.strip())


def test_every_help_page_prints():
    """argparse formats help strings with %: a bare '%' in one crashed `sacdiff --help` (found 2026-11-25)."""
    import contextlib
    import io as stdio

    from SACDiffLib.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    for name, sub in [("sacdiff", parser), *commands.items()]:
        with contextlib.redirect_stdout(stdio.StringIO()) as out:
            sub.print_help()
        assert "usage:" in out.getvalue(), name


def test_info_prints_the_models_detection_defaults(tiny_checkpoint, tmp_path, capsys):
    from SACDiffLib.checkpoint import load_checkpoint

    slim = tmp_path / "s.pt"
    assert run_cli("slim", tiny_checkpoint, "--out", slim, "--lambda", 6, "--background", "lung-shell",
                   "--vessel-suppression") == 0
    capsys.readouterr()
    assert run_cli("info", "--model", slim) == 0
    info = json.loads(capsys.readouterr().out)
    det = load_checkpoint(slim)[0].detect
    assert (info["lambda"], info["steps"], info["ensemble"], info["background"], info["vessel_suppression"]) == \
        (6.0, det.steps, det.ensemble, "lung-shell", True)


def test_a_profile_sets_its_settings_and_the_users_options_win(tiny_checkpoint, data_dir, tmp_path, capsys):
    """``--profile solid-lesions`` (config.DETECT_PROFILES) lands in the run's settings; an explicit option overrides
    it; on a model whose T (100) is below the profile's deep T_s the refusal names the option to change."""
    from SACDiffLib.config import DETECT_PROFILES

    err = _detect_error(capsys, data_dir / "ct" / "sick_ct.nii.gz", tiny_checkpoint, tmp_path / "refused",
                        "--lung", data_dir / "ct" / "sick_lung.nii.gz", "--profile", "solid-lesions")
    assert "--deep-steps" in err and not (tmp_path / "refused").exists()
    out = tmp_path / "run"
    assert run_cli("detect", data_dir / "ct" / "sick_ct.nii.gz", "--lung", data_dir / "ct" / "sick_lung.nii.gz",
                   "--model", tiny_checkpoint, "--out", out, "--profile", "solid-lesions", "--deep-steps", 40,
                   "--deep-sampling-steps", 3, "--lambda", 3) == 0
    det = json.loads((out / "report.json").read_text())["config"]["detect"]
    profile = DETECT_PROFILES["solid-lesions"]
    assert (det["deep_steps"], det["deep_sampling_steps"], det["lam"]) == (40, 3, 3.0)  # the user's
    assert (det["background"], det["deep_opening_mm"], det["deep_error_radius"]) == (
        profile["background"], profile["deep_opening_mm"], profile["deep_error_radius"])  # the profile's
