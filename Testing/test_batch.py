"""Detection over many scans: folders, lists, data folders, and shared over 2 torchrun ranks (gloo, CPU)."""

import csv
import os
import subprocess
import sys

import numpy as np
import SimpleITK as sitk

from conftest import ROOT
from SACDiffLib.batch import collect_scans
from SACDiffLib.cli import main


def _summary(out):
    with open(out / "summary.csv") as f:
        return list(csv.DictReader(f))


def test_collect_scans_from_a_data_folder_and_a_folder_of_volumes(data_dir, tmp_path):
    scans = collect_scans([data_dir])
    assert [s.name for s in scans] == ["normal_a", "normal_b", "sick"]
    assert all(s.lung is not None and s.lung.name == f"{s.name}_lung.nii.gz" for s in scans)
    scans = collect_scans([data_dir / "ct"])  # plain folder: *_lung and *_lesion files are masks, not scans
    assert [s.name for s in scans] == ["normal_a", "normal_b", "sick"]
    assert scans[2].lung == data_dir / "ct" / "sick_lung.nii.gz"


def test_detect_over_a_data_folder_writes_one_run_per_scan_and_a_summary(data_dir, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "many"
    assert main(["detect", str(data_dir), "--model", str(tiny_checkpoint), "--out", str(out), "--device", "cpu",
                 "--no-crf"]) == 0
    rows = _summary(out)
    assert [r["scan"] for r in rows] == ["normal_a", "normal_b", "sick"] and {r["status"] for r in rows} == {"ok"}
    single = tmp_path / "single"
    assert main(["detect", str(data_dir / "ct" / "sick_ct.nii.gz"), "--lung", str(data_dir / "ct" / "sick_lung.nii.gz"),
                 "--model", str(tiny_checkpoint), "--out", str(single), "--device", "cpu", "--no-crf"]) == 0
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "sick" / "anomaly_map.nii.gz")))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(single / "anomaly_map.nii.gz")))
    np.testing.assert_array_equal(a, b)  # the batch path is the single-scan path, scan by scan
    assert not list(out.glob(".rank*"))


def test_lung_option_is_refused_for_several_scans(data_dir, tiny_checkpoint, tmp_path, capsys):
    assert main(["detect", str(data_dir), "--lung", str(data_dir / "ct" / "sick_lung.nii.gz"), "--model",
                 str(tiny_checkpoint), "--out", str(tmp_path / "o")]) == 2
    assert "one scan" in capsys.readouterr().err


def test_two_ranks_share_the_scans_and_rank_zero_writes_one_summary(data_dir, tiny_checkpoint, tmp_path):
    out = tmp_path / "ranks"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    from conftest import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
           "-m", "SACDiffLib", "detect", str(data_dir), "--model", str(tiny_checkpoint), "--out", str(out),
           "--device", "cpu", "--no-crf", "--progress", "lines"]
    proc = subprocess.run(cmd, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _summary(out)
    assert [r["scan"] for r in rows] == ["normal_a", "normal_b", "sick"]
    assert [r["rank"] for r in rows] == ["0", "1", "0"] and {r["status"] for r in rows} == {"ok"}
    for r in rows:
        assert (out / r["scan"] / "report.json").is_file()
