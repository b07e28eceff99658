"""`sacdiff ablation --quick`: the whole Tables 1–2 grid on tiny phantoms (the CI form of the ablation)."""

import json

import pytest

from SACDiffLib.experiments.ablation import ROWS, model_name
from SACDiffLib.checkpoint import load_checkpoint
from SACDiffLib.config import derive
from SACDiffLib.cli import main
from SACDiffLib.detect import detect_volume
from SACDiffLib.experiments.phantom import write_phantom_cases


def test_ablation_quick_runs_every_row_and_calibrates_fixed_alpha_on_normals(tmp_path, capsys):
    out = tmp_path / "ablation"
    assert main(["ablation", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    result = json.loads((out / "ablation.json").read_text())
    assert [r["config"] for r in result["rows"]] == [r[0] for r in ROWS]
    table = (out / "ablation.md").read_text()
    assert table.count("\n| ") == len(ROWS) and "SAC-Diff w/o ensemble" in table
    for row, (_, simplex, guidance, adaptive, ensemble) in zip(result["rows"], ROWS):
        assert row["model"] == model_name(simplex, guidance)
        assert (row["fixed_alpha"] is None) == adaptive
        assert (row["ensemble"] > 1) == ensemble
        # precision is undefined (left out) when a row flags nothing at all
        assert {"iou", "dice", "recall", "fpr", "slice_auroc", "voxel_auroc", "oracle_dice", "baseline_dice"} <= set(
            row["metrics"]) <= {"iou", "dice", "precision", "recall", "fpr", "slice_auroc", "voxel_auroc",
                                "oracle_dice", "baseline_dice"}
    for name in ("gaussian-unguided", "gaussian-guided", "simplex-unguided", "simplex-guided"):
        cfg, *_ = load_checkpoint(out / "models" / f"{name}.pt")
        assert cfg.model.conditional == name.endswith("-guided")
        assert cfg.diffusion.noise.kind == name.split("-")[0]


def test_fixed_alpha_flags_one_percent_of_healthy_lung(tmp_path, tiny_checkpoint):
    """The fixed threshold is the 99th percentile of the lung error of the normal cases: re-measure it."""
    from SACDiffLib.experiments.ablation import fixed_alpha

    data = write_phantom_cases(tmp_path / "d", cases=1, kind="covid", size=48, slices=8, seed=2, normals=2)
    cfg, model, diffusion, _ = load_checkpoint(tiny_checkpoint)
    cfg = derive(cfg, detect={"steps": 3, "crf": False})
    alpha = fixed_alpha(data, model, diffusion, cfg, "cpu")
    flagged, total = 0, 0
    for name in ("phantom_normal_000", "phantom_normal_001"):
        r = detect_volume(data / "ct" / f"{name}_ct.nii.gz", model, diffusion, cfg,
                          data / "ct" / f"{name}_lung.nii.gz")
        e = r.error[r.processed][r.lung[r.processed] > 0]
        flagged += int((e > alpha).sum())
        total += e.size
    assert flagged / total == pytest.approx(0.01, abs=0.002)
