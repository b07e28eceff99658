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

def _first_writer_wins(target, first, second, match):
    """``first`` commits, then ``second`` (created before that commit) fails with ``match``; the first's output stays
    and no temporary is left beside it."""
    with first as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(SACDiffError, match=match):
        with second as tmp:
            (tmp / "a.txt").write_text("second")
    assert (target / "a.txt").read_text() == "first"
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def test_two_writers_one_wins_the_other_gets_an_error(tmp_path):
    target = tmp_path / "out"
    _first_writer_wins(target, atomic.Output(target, "results"), atomic.Output(target, "results"),  # both: absent
                       match="another process")


def test_two_overwrite_writers_one_wins_the_other_gets_an_error(tmp_path):
    """Both started from the same existing output; the first commits; the second used to exchange over it and
    'succeed', silently discarding the first. Now it fails and the first's output stays."""
    target = tmp_path / "out"
    with atomic.Output(target, "results") as tmp:
        (tmp / "a.txt").write_text("original")
    _first_writer_wins(target, atomic.Output(target, "results", overwrite=True),
                       atomic.Output(target, "results", overwrite=True), match="written by another process")


def test_threshold_racing_detect_overwrite_keeps_the_new_detection(tmp_path, run_dir, data_dir, tiny_checkpoint):
    """`threshold` loaded the run, then `detect --overwrite` replaced it: the threshold's update (made from the old
    maps) must not replace the new detection."""
    from SACDiffLib.outputs import load_run, write_threshold_update
    from SACDiffLib.postprocess import rethreshold

    result = load_run(run_dir)
    assert run_cli("detect", data_dir / "ct" / "sick_ct.nii.gz", "--model", tiny_checkpoint, "--out", run_dir,
                   "--overwrite", "--steps", 2, "--no-crf", "--seed", 5) == 0
    new = _digest(run_dir)
    rethreshold(result, 3.0)
    with pytest.raises(SACDiffError, match="written by another process"):
        write_threshold_update(result, run_dir)
    assert _digest(run_dir) == new
    fresh = load_run(run_dir)  # a λ slider: two updates in a row from one load both land
    for lam in (2.0, 4.0):
        rethreshold(fresh, lam)
        write_threshold_update(fresh, run_dir)
    assert json.loads((run_dir / "report.json").read_text())["lambda"] == 4.0


def test_concurrent_thresholds_leave_one_consistent_run(run_dir, tmp_path):
    import shutil

    reference = tmp_path / "reference"
    shutil.copytree(run_dir, reference)
    procs = [subprocess.Popen([sys.executable, "-m", "SACDiffLib", "threshold", str(run_dir), "--lambda", lam,
                               "--no-crf"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for lam in ("0", "3", "1", "2")]
    codes = [p.wait(timeout=300) for p in procs]
    errors = [p.stderr.read().decode() for p in procs]
    assert 0 in codes and all(c in (0, 2) for c in codes), errors  # one wins; a raced one gets an error
    assert all("written by another process" in e for c, e in zip(codes, errors) if c == 2), errors
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
                                             (("--ensemble", "0"), "ensemble")])
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


# Round two (issue 22): classes of fault a hostile user still got through -------------------------------------------


def test_model_read_by_detect_is_an_input_and_never_overwritten(capsys, tmp_path, data_dir, tiny_checkpoint):
    """`detect --model RUN/m.pt --out RUN --overwrite` used to delete the checkpoint it had just read."""
    run = tmp_path / "run"
    assert run_cli("detect", data_dir / "ct" / "sick_ct.nii.gz", "--model", tiny_checkpoint, "--out", run,
                   "--steps", 2, "--no-crf") == 0
    model = run / "m.pt"
    model.write_bytes(Path(tiny_checkpoint).read_bytes())
    before = _digest(run)
    capsys.readouterr()
    line = _error(capsys, "detect", data_dir / "ct" / "sick_ct.nii.gz", "--model", model, "--out", run,
                  "--overwrite", "--steps", 2, "--no-crf")
    assert "would replace or hold the input" in line and str(model) in line
    assert _digest(run) == before


def test_benchmark_json_goes_through_the_atomic_writer(capsys, tmp_path, monkeypatch):
    """`benchmark --json PATH` used to overwrite any file in place, a CT included."""
    import SACDiffLib.experiments.benchmark as benchmark

    monkeypatch.setattr(benchmark, "run_benchmark", lambda device, quick: {"figure": 1.0})
    theirs = tmp_path / "ct.nii.gz"
    theirs.write_bytes(b"not ours")
    assert "already exists" in _error(capsys, "benchmark", "--json", theirs)
    assert "not written by SACDiff" in _error(capsys, "benchmark", "--json", theirs, "--overwrite")
    assert theirs.read_bytes() == b"not ours"
    ours = tmp_path / "bench.json"
    assert run_cli("benchmark", "--json", ours) == 0
    assert json.loads(ours.read_text()) == {"written_by": "SACDiff", "figure": 1.0}
    assert run_cli("benchmark", "--json", ours, "--overwrite") == 0  # its own file may be replaced


@pytest.mark.parametrize("name", ["../esc", "/tmp/abs", "a/b", "..", "with space", ""])
def test_case_names_that_would_escape_the_output_folder_are_refused(capsys, tmp_path, data_dir, name):
    data = tmp_path / "data"
    (data / "ct").mkdir(parents=True)
    (data / "cases.json").write_text(json.dumps({name: {"diagnosis": "covid"}}))
    line = _error(capsys, "evaluate", "--cases", data, "--out", tmp_path / "out", "--steps", 2)
    assert "not usable as a file name" in line
    assert not (tmp_path / "esc").exists() and not (tmp_path / "out").exists()


def test_a_case_described_by_something_else_than_an_object_is_refused_before_any_work(capsys, tmp_path):
    data = tmp_path / "data"
    (data / "ct").mkdir(parents=True)
    (data / "cases.json").write_text(json.dumps({"a": {"diagnosis": "covid"}, "b": "covid"}))
    assert "must be described by an object" in _error(capsys, "evaluate", "--cases", data, "--out", tmp_path / "o")


@pytest.mark.parametrize("options, expected", [
    (("--threshold", "fixed", "--fixed-threshold", "0.1", "--lambda", "3"), "--lambda has no effect"),
    (("--fixed-threshold", "0.1"), "--fixed-threshold is used only with --threshold fixed"),
])
def test_inert_threshold_options_are_refused(capsys, tmp_path, data_dir, tiny_checkpoint, options, expected):
    line = _error(capsys, "detect", data_dir / "ct" / "sick_ct.nii.gz", "--model", tiny_checkpoint,
                  "--out", tmp_path / "r", "--steps", 2, *options)
    assert expected in line and not (tmp_path / "r").exists()


def test_threshold_refuses_lambda_on_a_fixed_threshold_run(capsys, tmp_path, data_dir, tiny_checkpoint):
    run = tmp_path / "run"
    assert run_cli("detect", data_dir / "ct" / "sick_ct.nii.gz", "--model", tiny_checkpoint, "--out", run,
                   "--steps", 2, "--no-crf", "--threshold", "fixed", "--fixed-threshold", "0.1") == 0
    before = _digest(run)
    capsys.readouterr()
    assert "fixed α" in _error(capsys, "threshold", run, "--lambda", "3")
    assert _digest(run) == before


def test_the_report_names_the_ct_absolutely_and_a_changed_ct_is_not_drawn(tmp_path, data_dir, tiny_checkpoint,
                                                                        monkeypatch):
    """The report stored the CT path relative to where detect ran, so `threshold` from another folder drew another
    scan into overview.png. Now: absolute path + size/mtime; a CT that changed since is not used."""
    from SACDiffLib.outputs import load_run

    work = tmp_path / "work"
    work.mkdir()
    (work / "ct.nii.gz").write_bytes((data_dir / "ct" / "sick_ct.nii.gz").read_bytes())
    monkeypatch.chdir(work)
    assert run_cli("detect", "ct.nii.gz", "--model", tiny_checkpoint, "--out", "run", "--steps", 2, "--no-crf") == 0
    report = json.loads((work / "run" / "report.json").read_text())
    assert report["ct"] == str(work / "ct.nii.gz") and report["ct_fingerprint"]["bytes"] > 0
    monkeypatch.chdir(tmp_path)
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(work / "ct.nii.gz")))
    assert np.array_equal(load_run(work / "run").ct_hu, ct)  # the CT itself, from another folder
    other = tmp_path / "other.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(data_dir / "ct" / "normal_a_ct.nii.gz")), str(other))
    (work / "ct.nii.gz").write_bytes(other.read_bytes())  # another scan now under the same name
    changed = load_run(work / "run")
    assert changed.ct_hu is None  # not the other scan: the pictures fall back on the run's pseudo-healthy volume
    pseudo = sitk.GetArrayFromImage(sitk.ReadImage(str(work / "run" / "pseudo_healthy.nii.gz")))
    assert np.array_equal(changed.anatomy_hu(), pseudo)


def test_threshold_keeps_the_versions_that_made_the_maps(tmp_path, run_dir):
    before = json.loads((run_dir / "report.json").read_text())["versions"]
    assert run_cli("threshold", run_dir, "--lambda", "2") == 0
    after = json.loads((run_dir / "report.json").read_text())
    assert after["versions"] == before and after["versions"]["torch"] != "not loaded"
    assert "torch" not in after["threshold_versions"]


@pytest.mark.parametrize("section, field, value, expected", [
    ("preprocess", "hu_min", 1e30, "hu_min"),
    ("preprocess", "hu_max", 3e38, "hu_max"),
    ("model", "dropout", 5.0, "dropout"),
    ("detect", "steps", 10.5, "whole number"),
    ("detect", "crf", "yes", "true or false"),
    ("train", "steps", "many", "whole number"),
])
def test_checkpoint_settings_are_type_and_range_checked_on_load(capsys, tmp_path, data_dir, tiny_checkpoint, section,
                                                                field, value, expected):
    payload = torch.load(tiny_checkpoint, weights_only=True)
    payload["config"][section][field] = value
    bad = tmp_path / "bad.pt"
    torch.save(payload, bad)
    line = _error(capsys, "detect", data_dir / "ct" / "sick_ct.nii.gz", "--model", bad, "--out", tmp_path / "r")
    assert expected in line and not (tmp_path / "r").exists()


@pytest.mark.parametrize("options, expected", [
    (("--ensemble", "100000"), "ensemble"),
    (("--seed", str(2**64)), "seed"),
    (("--harmonise-steps", "50"), "harmonise_steps"),
])
def test_out_of_range_detection_options_get_one_line(capsys, tmp_path, data_dir, tiny_checkpoint, options, expected):
    line = _error(capsys, "detect", data_dir / "ct" / "sick_ct.nii.gz", "--model", tiny_checkpoint,
                  "--out", tmp_path / "r", "--steps", 2, *options)
    assert expected in line


@pytest.mark.parametrize("args, expected", [
    (("detect", "CT", "--steps", "0"), "detect.steps"),
    (("train", "--image-size", "0"), "image_size"),
    (("train", "--save-every", "-1"), "save_every"),
    (("train", "--seed", "-5"), "seed"),
    (("phantom", "--cases", "-1"), "--cases"),
])
def test_one_liners_name_the_option_at_fault(capsys, tmp_path, data_dir, tiny_checkpoint, args, expected):
    command, *rest = args
    if command == "detect":
        rest = [data_dir / "ct" / "sick_ct.nii.gz", "--model", tiny_checkpoint, "--out", tmp_path / "o", *rest[1:]]
    elif command == "train":
        rest = ["--data", data_dir, "--out", tmp_path / "m.pt", "--preset", "tiny", "--steps", "1", *rest]
    else:
        rest = ["--out", tmp_path / "p", *rest]
    line = _error(capsys, command, *rest)
    assert expected in line
    assert not any(tmp_path.iterdir())


@pytest.fixture()
def nearly_full_disk(tmp_path):
    """A 1 MiB tmpfs, full (root only; skipped with the reason elsewhere)."""
    import os

    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.decode().strip() or 'not root'}); the full-disk "
                    "case needs root (CI and the development machines run as root)")
    try:
        with open(mount / "filler", "wb") as f:
            f.write(b"\0" * (1024 * 1024))  # nothing left: any non-empty file ends truncated
        os.sync()
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.parametrize("what, free_kib", [("lungmask", 0), ("detect", 0), ("detect", 24)])
def test_a_full_disk_leaves_nothing_and_says_so(capsys, nearly_full_disk, data_dir, tiny_checkpoint, what, free_kib):
    """ITK's writer does not report ENOSPC: `lungmask` onto a nearly full disk used to exit 0 and leave a truncated
    mask. Every written image is now read back before it is put in place. With 24 KiB free the first files of a
    run fit and a later image is cut short."""
    filler = nearly_full_disk / "filler"
    filler.write_bytes(b"\0" * (1024 * 1024 - free_kib * 1024))

    ct = nearly_full_disk.parent / "noisy_ct.nii.gz"  # a real CT-like input (int16, noisy)
    image = sitk.ReadImage(str(data_dir / "ct" / "sick_ct.nii.gz"))
    array = sitk.GetArrayFromImage(image).astype(np.int16)
    rng = np.random.default_rng(0)
    array = (array + rng.integers(-30, 30, array.shape)).astype(np.int16)
    noisy = sitk.GetImageFromArray(array)
    noisy.CopyInformation(image)
    sitk.WriteImage(noisy, str(ct))
    before = sorted(p.name for p in nearly_full_disk.iterdir())
    if what == "lungmask":
        out = nearly_full_disk / "mask.nii.gz"
        code = run_cli("lungmask", ct, "--out", out)
    else:
        out = nearly_full_disk / "run"
        code = run_cli("detect", ct, "--model", tiny_checkpoint, "--out", out, "--steps", 2, "--no-crf")
    err = capsys.readouterr().err
    assert code == 2 and "error:" in err.strip().splitlines()[-1]
    assert sorted(p.name for p in nearly_full_disk.iterdir()) == before  # nothing partial, no temporary


@pytest.mark.parametrize("name", ["mask.png", "mask.xyz", "mask.mhd"])
def test_output_formats_without_3d_geometry_are_refused_before_the_work(capsys, tmp_path, data_dir, name):
    """`lungmask --out mask.png` used to exit 0 having written one all-zero 2D PNG; `.xyz` failed after the work."""
    line = _error(capsys, "lungmask", data_dir / "ct" / "sick_ct.nii.gz", "--out", tmp_path / name)
    assert "keep the 3D geometry" in line and not any(tmp_path.iterdir())


def test_an_interrupted_batch_keeps_its_finished_scans_and_says_so(capsys, tmp_path, data_dir, tiny_checkpoint,
                                                                  monkeypatch):
    """SIGTERM during a batch used to print "no partial output was left" while the folder kept the finished scans
    and no summary.csv. Each scan is its own complete run: they stay, summary.csv lists them and the cancelled ones,
    and the message says so."""
    import SACDiffLib.detect as detect_module

    real = detect_module.detect_volume
    calls = []

    def interrupted_on_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what cli.main turns SIGTERM into
        return real(*args, **kwargs)

    monkeypatch.setattr(detect_module, "detect_volume", interrupted_on_the_second)
    scans = [data_dir / "ct" / f"{n}_ct.nii.gz" for n in ("normal_a", "normal_b", "sick")]
    code = run_cli("detect", *scans, "--model", tiny_checkpoint, "--out", tmp_path / "batch", "--steps", 2,
                   "--no-crf")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 130 and "1 of 3 scan(s) finished and kept" in err
    rows = (tmp_path / "batch" / "summary.csv").read_text().splitlines()
    assert [r.split(",")[:2] for r in rows[1:]] == [["normal_a", "ok"], ["normal_b", "cancelled"],
                                                    ["sick", "cancelled"]]
    assert (tmp_path / "batch" / "normal_a" / "report.json").is_file()
    assert not (tmp_path / "batch" / "normal_b").exists()
    assert not [p for p in (tmp_path / "batch").iterdir() if ".tmp-" in p.name]


def test_one_bad_case_no_longer_ruins_an_evaluation(capsys, tmp_path, data_dir, tiny_checkpoint):
    """A truncated case is refused before any work (naming the case); a case that fails during the work (its lung
    mask on another grid) is reported in the results and the other cases' results are kept."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    good = (data / "ct" / "sick_ct.nii.gz").read_bytes()
    (data / "ct" / "normal_b_ct.nii.gz").write_bytes(good[: len(good) // 2])
    line = _error(capsys, "evaluate", "--cases", data, "--model", tiny_checkpoint, "--out", tmp_path / "e1",
                  "--steps", 2, "--no-crf")
    assert "case normal_b" in line and "ends early" in line and not (tmp_path / "e1").exists()

    (data / "ct" / "normal_b_ct.nii.gz").write_bytes((data_dir / "ct" / "normal_b_ct.nii.gz").read_bytes())
    lung = sitk.ReadImage(str(data / "ct" / "normal_b_lung.nii.gz"))
    lung.SetSpacing((3.0, 3.0, 3.0))  # a mask made for another scan: fails inside the work
    sitk.WriteImage(lung, str(data / "ct" / "normal_b_lung.nii.gz"))
    assert run_cli("evaluate", "--cases", data, "--model", tiny_checkpoint, "--out", tmp_path / "e2", "--steps", 2,
                   "--no-crf") == 0
    summary = json.loads((tmp_path / "e2" / "summary.json").read_text())
    assert list(summary["failed"]) == ["normal_b"] and "geometry" in summary["failed"]["normal_b"]
    assert set(summary["cases"]) == {"normal_a", "sick"}
    assert "error:" in (tmp_path / "e2" / "summary.md").read_text()
    assert (tmp_path / "e2" / "runs" / "sick" / "report.json").is_file()


def test_dicom_seg_references_the_series_and_holds_the_nifti_mask(tmp_path, tiny_checkpoint):
    """detect --dicom-seg on a DICOM series written from a phantom: the SEG read back with highdicom has the
    anomaly mask of the NIfTI output frame by frame, references every source instance, and keeps the source's frame
    of reference; the segment is coded as in the Slicer module."""
    pytest.importorskip("highdicom", reason="highdicom not installed (pip install -e .[test] installs it)")
    import highdicom as hd
    import pydicom

    from conftest import make_chest, to_image, write_dicom_series

    hu, _, _ = make_chest(64, 12, 3, lesion=True)
    folder = write_dicom_series(to_image(hu.astype(np.int16), dtype=np.int16), tmp_path / "series")
    run = tmp_path / "run"
    assert run_cli("detect", folder, "--model", tiny_checkpoint, "--out", run, "--steps", 2, "--no-crf",
                   "--lambda", "0", "--dicom-seg") == 0
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(run / "anomaly_mask.nii.gz")))
    assert mask.any()
    seg = hd.seg.segread(str(run / "anomaly.seg.dcm"))
    sources = {pydicom.dcmread(str(f)).SOPInstanceUID: f for f in sorted(folder.iterdir())}
    first = pydicom.dcmread(str(next(iter(sources.values()))))
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    from SACDiffLib.dicomseg import series_files

    order = [pydicom.dcmread(str(f)).SOPInstanceUID for f in series_files(folder)]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=order, segment_numbers=[1])
    np.testing.assert_array_equal(pixels[..., 0] > 0, mask > 0)
    description = seg.SegmentSequence[0]
    assert description.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert description.SegmentedPropertyTypeCodeSequence[0].CodeValue == "4147007"
    assert description.SegmentAlgorithmName == "SACDiff"


def test_dicom_seg_needs_a_dicom_series(capsys, tmp_path, data_dir, tiny_checkpoint):
    pytest.importorskip("highdicom", reason="highdicom not installed")
    line = _error(capsys, "detect", data_dir / "ct" / "sick_ct.nii.gz", "--model", tiny_checkpoint, "--out",
                  tmp_path / "r", "--steps", 2, "--dicom-seg")
    assert "needs the CT as a DICOM series folder" in line and not (tmp_path / "r").exists()


def test_an_output_name_too_long_for_the_filesystem_gets_one_line(capsys, tmp_path, data_dir, tiny_checkpoint):
    line = _error(capsys, "detect", data_dir / "ct" / "sick_ct.nii.gz", "--model", tiny_checkpoint, "--out",
                  tmp_path / ("x" * 300), "--steps", 2)
    assert "cannot write" in line or "too long" in line.lower()
    assert not any(tmp_path.iterdir())


def test_overwrite_onto_a_symlinked_run_names_the_link(capsys, tmp_path, run_dir, data_dir, tiny_checkpoint):
    link = tmp_path / "link"
    link.symlink_to(run_dir)
    capsys.readouterr()
    line = _error(capsys, "detect", data_dir / "ct" / "sick_ct.nii.gz", "--model", tiny_checkpoint, "--out", link,
                  "--overwrite", "--steps", 2)
    assert "symbolic link" in line and link.is_symlink()


def test_a_killed_image_writers_inner_temporary_is_removed_by_the_next_writer(tmp_path, data_dir):
    """`lungmask --out mask.nii.gz` SIGKILLed inside ITK's write leaves Output's temporary AND io.write_image's inner
    one (``..mask.nii.gz.tmp-PID-…``); the next writer beside it removes both once that process is gone."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    outer = tmp_path / f".mask.nii.gz.tmp-{dead}-abcd1234.nii.gz"
    inner = tmp_path / f"..mask.nii.gz.tmp-{dead}-abcd1234.nii.gz.tmp-{dead}-w.nii.gz"
    outer.write_bytes(b"partial")
    inner.write_bytes(b"partial")
    assert run_cli("lungmask", data_dir / "ct" / "sick_ct.nii.gz", "--out", tmp_path / "mask.nii.gz") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.nii.gz"]


@pytest.mark.parametrize("option", ["--dicom-seg", "--compile"])
def test_evaluate_does_not_offer_options_it_would_ignore(capsys, tmp_path, data_dir, option):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("evaluate", "--cases", data_dir, "--out", tmp_path / "e", option)
    assert exit_info.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err
