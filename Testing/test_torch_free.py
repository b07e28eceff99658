"""Reading a finished run, re-thresholding it and writing it back need no torch: the Slicer module does this in
Slicer's own process, where torch is never imported (detection runs in a child process)."""

import subprocess
import sys
from pathlib import Path

from SACDiffLib.cli import main

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
from SACDiffLib.outputs import load_run, write_threshold_update
from SACDiffLib.postprocess import rethreshold
from SACDiffLib.lung import segment_lungs
from SACDiffLib import atomic, io, metrics
from SACDiffLib.experiments import medseg
result = load_run(sys.argv[1])
before = int(result.mask.sum())
rethreshold(result, 3.0)
write_threshold_update(result, sys.argv[1])
print("ok", before, int(result.mask.sum()))
"""


def test_results_load_and_rethreshold_with_torch_unimportable(data_dir, tiny_checkpoint, tmp_path):
    run = tmp_path / "run"
    assert main(["detect", str(data_dir / "ct" / "sick_ct.nii.gz"), "--model", str(tiny_checkpoint), "--out",
                 str(run), "--steps", "2", "--lambda", "0"]) == 0
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(run)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    status, before, after = done.stdout.split()
    assert status == "ok" and int(after) <= int(before)
    import json

    assert json.loads((run / "report.json").read_text())["lambda"] == 3.0


def test_slicer_module_files_import_nothing_that_imports_torch():
    done = subprocess.run([sys.executable, "-c", "import sys; sys.modules['torch'] = None; "
                           "import SACDiffLib.outputs, SACDiffLib.postprocess, SACDiffLib.io, SACDiffLib.lung, "
                           "SACDiffLib.atomic, SACDiffLib.errors, SACDiffLib.config"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
