"""Fault injection (issue: never lose a file, never call a broken input healthy). Every probe is a command a user
could type; each must end in one clear error line (exit 2) or a complete, correct output — never in a deleted
input, a partial output or a non-finite 'result'."""

import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SACDiffLib import atomic
from SACDiffLib.cli import main
from SACDiffLib.errors import SACDiffError


def run_cli(*args):
    return main([str(a) for a in args])


def _error(capsys, *args) -> str:
    code = run_cli(*args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0], err
    return lines[0]


def _digest(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def victim(tmp_path, data_dir):
    """A user's folder holding a CT, its lung mask and an unrelated file."""
    folder = tmp_path / "victim"
    folder.mkdir()
    for name in ("sick_ct.nii.gz", "sick_lung.nii.gz"):
        (folder / name).write_bytes((data_dir / "ct" / name).read_bytes())
    (folder / "notes.txt").write_text("mine")
    return folder


@pytest.fixture()
def run_dir(tmp_path, data_dir, tiny_checkpoint):
    out = tmp_path / "run"
    assert run_cli("detect", data_dir / "ct" / "sick_ct.nii.gz", "--model", tiny_checkpoint, "--out", out,
                   "--steps", 2, "--no-crf") == 0
    return out


# 1. --overwrite never deletes an input or anything SACDiff did not write ------------------------------------------

def test_detect_overwrite_into_the_inputs_folder_is_refused(victim, tiny_checkpoint, capsys):
    before = _digest(victim)
    err = _error(capsys, "detect", victim / "sick_ct.nii.gz", "--lung", victim / "sick_lung.nii.gz", "--model",
                 tiny_checkpoint, "--out", victim, "--overwrite", "--steps", 2)
    assert "input" in err and _digest(victim) == before


def test_lungmask_onto_its_own_ct_is_refused(victim, capsys):
    before = _digest(victim)
    err = _error(capsys, "lungmask", victim / "sick_ct.nii.gz", "--out", victim / "sick_ct.nii.gz", "--overwrite")
    assert "input" in err and _digest(victim) == before


def test_lungmask_overwrites_only_its_own_file(victim, tmp_path, capsys):
    mine = tmp_path / "lung.nii.gz"
    assert run_cli("lungmask", victim / "sick_ct.nii.gz", "--out", mine) == 0
    assert run_cli("lungmask", victim / "sick_ct.nii.gz", "--out", mine, "--overwrite") == 0  # SACDiff's own
    foreign = tmp_path / "foreign.nii.gz"
    foreign.write_bytes((victim / "sick_lung.nii.gz").read_bytes())
    assert "not written by SACDiff" in _error(capsys, "lungmask", victim / "sick_ct.nii.gz", "--out", foreign,
                                              "--overwrite")


def test_train_never_replaces_a_checkpoint_unasked(data_dir, tmp_path, tiny_checkpoint, capsys):
    existing = tmp_path / "existing.pt"
    existing.write_bytes(tiny_checkpoint.read_bytes())
    before = existing.read_bytes()
    assert "already exists" in _error(capsys, "train", "--data", data_dir, "--out", existing, "--preset", "tiny",
                                      "--steps", 1)
    other = tmp_path / "notes.pt"
    other.write_text("not a checkpoint")
    assert "not written by SACDiff" in _error(capsys, "train", "--data", data_dir, "--out", other, "--preset",
                                              "tiny", "--steps", 1, "--overwrite")
    assert existing.read_bytes() == before and other.read_text() == "not a checkpoint"


# 2. truncated files ---------------------------------------------------------------------------------------------

def test_truncated_gzip_is_refused_by_detect_and_train(data_dir, tmp_path, tiny_checkpoint, capsys):
    data = tmp_path / "data"
    (data / "ct").mkdir(parents=True)
    for f in (data_dir / "ct").iterdir():
        (data / "ct" / f.name).write_bytes(f.read_bytes())
    (data / "cases.json").write_text((data_dir / "cases.json").read_text())
    whole = (data / "ct" / "normal_a_ct.nii.gz").read_bytes()
    (data / "ct" / "normal_a_ct.nii.gz").write_bytes(whole[: len(whole) // 2])
    assert "ends early" in _error(capsys, "detect", data / "ct" / "normal_a_ct.nii.gz", "--model", tiny_checkpoint,
                                  "--out", tmp_path / "o", "--steps", 2)
    assert "ends early" in _error(capsys, "train", "--data", data, "--out", tmp_path / "m.pt", "--preset", "tiny",
                                  "--steps", 1)
    assert not (tmp_path / "o").exists() and not (tmp_path / "m.pt").exists()


def test_uncompressed_nifti_shorter_than_its_header_is_refused(tmp_path):
    from SACDiffLib import io

    image = sitk.GetImageFromArray(np.full((4, 16, 16), -800, np.int16))
    sitk.WriteImage(image, str(tmp_path / "ct.nii"))
    data = (tmp_path / "ct.nii").read_bytes()
    (tmp_path / "short.nii").write_bytes(data[:-100])
    io.read_image(tmp_path / "ct.nii")
    with pytest.raises(SACDiffError, match="ends early"):
        io.read_image(tmp_path / "short.nii")


# 3. non-finite values are errors, never "0.0 ml" -------------------------------------------------------------------

@pytest.mark.parametrize("option", [("--lambda", "nan"), ("--lambda", "inf"),
                                    ("--threshold", "fixed", "--fixed-threshold", "nan")])
def test_non_finite_options_are_refused_before_work(data_dir, tmp_path, tiny_checkpoint, capsys, option):
    err = _error(capsys, "detect", data_dir / "ct" / "sick_ct.nii.gz", "--model", tiny_checkpoint, "--out",
                 tmp_path / "o", "--steps", 2, *option)
    assert "finite" in err and not (tmp_path / "o").exists()


def test_threshold_nan_leaves_the_run_untouched(run_dir, capsys):
    before = _digest(run_dir)
    assert "finite" in _error(capsys, "threshold", run_dir, "--lambda", "nan")
    assert _digest(run_dir) == before


def test_nan_weights_and_nan_config_are_refused(data_dir, tmp_path, tiny_checkpoint, capsys):
    payload = torch.load(tiny_checkpoint, weights_only=True)
    bad = dict(payload, ema={k: v.clone() for k, v in payload["ema"].items()})
    first = next(k for k, v in bad["ema"].items() if v.is_floating_point())
    bad["ema"][first][...] = float("nan")
    torch.save(bad, tmp_path / "nan-weights.pt")
    assert "NaN" in _error(capsys, "detect", data_dir / "ct" / "sick_ct.nii.gz", "--model", tmp_path / "nan-weights.pt",
                           "--out", tmp_path / "o1")
    cfg_bad = dict(payload, config=json.loads(json.dumps(payload["config"])))
    cfg_bad["config"]["preprocess"]["hu_min"] = float("nan")
    torch.save(cfg_bad, tmp_path / "nan-config.pt")
    assert "non-finite" in _error(capsys, "detect", data_dir / "ct" / "sick_ct.nii.gz", "--model",
                                  tmp_path / "nan-config.pt", "--out", tmp_path / "o2")


def test_report_is_strict_json(run_dir):
    json.loads((run_dir / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))


# 4. races ---------------------------------------------------------------------------------------------------------

def test_two_writers_one_wins_the_other_gets_an_error(tmp_path):
    target = tmp_path / "out"
    first, second = atomic.Output(target, "results"), atomic.Output(target, "results")  # both checked: absent
    with first as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(SACDiffError, match="another process"):
        with second as tmp:
            (tmp / "a.txt").write_text("second")
    assert (target / "a.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary left


def test_concurrent_thresholds_leave_one_consistent_run(run_dir, tmp_path):
    import shutil

    reference = tmp_path / "reference"
    shutil.copytree(run_dir, reference)
    procs = [subprocess.Popen([sys.executable, "-m", "SACDiffLib", "threshold", str(run_dir), "--lambda", lam,
                               "--no-crf"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for lam in ("0", "3", "1", "2")]
    codes = [p.wait(timeout=300) for p in procs]
    assert all(c == 0 for c in codes), [p.stderr.read() for p in procs]
    lam = json.loads((run_dir / "report.json").read_text())["lambda"]
    assert run_cli("threshold", reference, "--lambda", lam, "--no-crf") == 0  # the same λ, alone
    read = lambda d: sitk.GetArrayFromImage(sitk.ReadImage(str(d / "anomaly_mask.nii.gz")))  # noqa: E731
    assert np.array_equal(read(run_dir), read(reference))  # the mask belongs to the report's λ
    assert not [p for p in run_dir.parent.iterdir() if ".tmp-" in p.name]


# 5. faults while writing ------------------------------------------------------------------------------------------

# A child of a non-interactive shell's background job (CI, nohup … &) inherits SIGINT *ignored*, and Python then
# installs no KeyboardInterrupt handler; Ctrl-C in a terminal reaches a process with the default one. The writer
# restores it so that the SIGINT case tests SACDiff's clean-up path, not the CI shell's signal disposition.
_WRITER = """
import signal, sys, time
from SACDiffLib.cli import _terminate_as_interrupt
from SACDiffLib.atomic import Output
signal.signal(signal.SIGINT, signal.default_int_handler)
_terminate_as_interrupt()
with Output(sys.argv[1], "results") as tmp:
    (tmp / "part.txt").write_text("x")
    print("writing", flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_terminate_while_writing_leaves_nothing(tmp_path, sig):
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path / "out")], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"writing"
    proc.send_signal(sig)
    proc.wait(timeout=30)
    assert list(tmp_path.iterdir()) == []


def test_sigkill_residue_is_cleaned_by_the_next_writer(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path / "out")], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"writing"
    proc.kill()
    proc.wait(timeout=30)
    assert len(list(tmp_path.iterdir())) == 1  # the dead process's temporary folder
    with atomic.Output(tmp_path / "out", "results") as tmp:
        (tmp / "a.txt").write_text("ok")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_full_disk_at_commit_changes_nothing(tmp_path, monkeypatch):
    target = tmp_path / "out"
    with atomic.Output(target, "results") as tmp:
        (tmp / "a.txt").write_text("old")

    def no_space(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic, "exchange", no_space)
    with pytest.raises(SACDiffError, match="No space left"):
        with atomic.Output(target, "results", overwrite=True) as tmp:
            (tmp / "a.txt").write_text("new")
    assert (target / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_unwritable_output_folder_is_refused_before_work(tmp_path, monkeypatch):
    real = Path.write_bytes

    def refuse(self, data):
        if ".tmp-" in self.name:
            raise OSError(30, "Read-only file system")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", refuse)
    with pytest.raises(SACDiffError, match="Read-only"):
        atomic.Output(tmp_path / "out", "results")


# 6. settings checked in one place ---------------------------------------------------------------------------------

@pytest.mark.parametrize("option,expected", [(("--sampling-steps", "-1"), "out of range"),
                                             (("--sampling-steps", "99"), "out of range"),
                                             (("--batch-size", "-1"), "out of range"),
                                             (("--ensemble", "0"), "K=0")])
def test_detect_options_are_range_checked(data_dir, tmp_path, tiny_checkpoint, capsys, option, expected):
    err = _error(capsys, "detect", data_dir / "ct" / "sick_ct.nii.gz", "--model", tiny_checkpoint, "--out",
                 tmp_path / "o", "--steps", 2, *option)
    assert expected in err


@pytest.mark.parametrize("option,expected", [(("--steps", "0"), "out of range"), (("--steps", "-1"), "out of range"),
                                             (("--lr", "nan"), "non-finite"), (("--batch-size", "0"), "out of range")])
def test_train_options_are_range_checked(data_dir, tmp_path, capsys, option, expected):
    err = _error(capsys, "train", "--data", data_dir, "--out", tmp_path / "m.pt", "--preset", "tiny", *option)
    assert expected in err and not (tmp_path / "m.pt").exists()


def test_resume_refuses_settings_it_would_ignore(data_dir, tmp_path, tiny_checkpoint, capsys):
    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(tiny_checkpoint.read_bytes())
    assert "would be ignored" in _error(capsys, "train", "--data", data_dir, "--out", ckpt, "--resume", ckpt,
                                        "--preset", "small", "--image-size", "64")


# 7. wrong label images, damaged runs ------------------------------------------------------------------------------

def test_the_ct_given_as_lung_mask_is_refused(data_dir, tmp_path, tiny_checkpoint, capsys):
    err = _error(capsys, "detect", data_dir / "ct" / "sick_ct.nii.gz", "--lung", data_dir / "ct" / "sick_ct.nii.gz",
                 "--model", tiny_checkpoint, "--out", tmp_path / "o", "--steps", 2)
    assert "not labels" in err


def test_a_probability_map_is_not_a_label_image(data_dir, tmp_path, tiny_checkpoint, capsys):
    lung = sitk.ReadImage(str(data_dir / "ct" / "sick_lung.nii.gz"))
    soft = sitk.Cast(lung, sitk.sitkFloat32) * 0.4
    sitk.WriteImage(soft, str(tmp_path / "soft.nii.gz"))
    err = _error(capsys, "detect", data_dir / "ct" / "sick_ct.nii.gz", "--lung", tmp_path / "soft.nii.gz",
                 "--model", tiny_checkpoint, "--out", tmp_path / "o", "--steps", 2)
    assert "fractional" in err


@pytest.mark.parametrize("damage,expected", [("truncated map", "ends early"),
                                             ("report without threshold", "lacks threshold"),
                                             ("lung of other geometry", "different geometries")])
def test_threshold_on_a_damaged_run_is_one_error_line(run_dir, capsys, damage, expected):
    if damage == "truncated map":
        data = (run_dir / "anomaly_map.nii.gz").read_bytes()
        (run_dir / "anomaly_map.nii.gz").write_bytes(data[: len(data) // 2])
    elif damage == "report without threshold":
        report = json.loads((run_dir / "report.json").read_text())
        del report["threshold"]
        (run_dir / "report.json").write_text(json.dumps(report))
    else:
        lung = sitk.ReadImage(str(run_dir / "lung_mask.nii.gz"))
        lung.SetSpacing([2 * s for s in lung.GetSpacing()])
        sitk.WriteImage(lung, str(run_dir / "lung_mask.nii.gz"))
    before = _digest(run_dir)
    assert expected in _error(capsys, "threshold", run_dir, "--lambda", "2")
    assert _digest(run_dir) == before


# 9. messages ------------------------------------------------------------------------------------------------------

def test_model_folder_and_geometry_messages(data_dir, tmp_path, capsys):
    assert "is a folder" in _error(capsys, "detect", data_dir / "ct" / "sick_ct.nii.gz", "--model", tmp_path,
                                   "--out", tmp_path / "o")
    from SACDiffLib import io

    a = sitk.Image(4, 4, 4, sitk.sitkUInt8)
    b = sitk.Image(4, 4, 4, sitk.sitkUInt8)
    b.SetSpacing((2, 2, 2))
    assert "np.float64" not in " ".join(io.geometry_differences(a, b))


def test_replaced_file_lands_whole_or_not_at_all(tmp_path):
    from SACDiffLib.atomic import replaced_file

    target = tmp_path / "summary.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with replaced_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.csv"]
    with replaced_file(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.csv"]
