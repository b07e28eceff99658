"""The shipped reference models — the 2.5D default and the 2D model beside it: load through the checkpoint checks, are
small, drive the demo; on real data (when ../shared/data is present) the default separates infected from uninfected
slices of ctmd_P001."""

import json


from conftest import ROOT, SHARED_DATA, needs_shared_data
from SACDiffLib.checkpoint import load_checkpoint, read_checkpoint, shipped_model_path
from SACDiffLib.config import derive
from SACDiffLib.cli import main

MODEL = ROOT / "Resources" / "models" / "sacdiff-small256-context.pt"
MODEL_2D = ROOT / "Resources" / "models" / "sacdiff-small256.pt"


def test_shipped_model_is_found_loads_and_is_small():
    assert shipped_model_path() == MODEL
    for path, context, lam, background in ((MODEL, 1, 8.0, "lung-shell"), (MODEL_2D, 0, 12.0, "body")):
        assert path.stat().st_size <= 25 * 2**20
        cfg, model, diffusion, payload = load_checkpoint(path)
        assert cfg.preprocess.image_size == 256 and cfg.model.conditional and cfg.diffusion.noise.kind == "simplex"
        assert cfg.train.max_timestep >= cfg.detect.steps and cfg.train.holdout_every == 5  # chosen on the hold-out
        # the settings the label-free validation chose (MODEL_CARD.md): T_s 100, 10 steps, K 3, the model's own λ
        # and α's background region (map-candidates.md rounds 15 and 17 for the default)
        assert (cfg.detect.steps, cfg.detect.sampling_steps, cfg.detect.ensemble, cfg.detect.lam,
                cfg.detect.background) == (100, 10, 3, lam, background)
        assert cfg.model.context_slices == context
        assert payload["extra"]["stored_dtype"] == "float16"
        assert read_checkpoint(path)["ema"] is None  # slim form: no optimizer state, no second copy
    assert (ROOT / "Resources" / "models" / "MODEL_CARD.md").is_file()


def test_demo_with_the_shipped_model_short_form(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--sampling-steps", "3", "--ensemble", "2", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "Dice" in text and (out / "overview.png").is_file() and (out / "run" / "report.json").is_file()
    report = json.loads((out / "run" / "report.json").read_text())
    assert report["network_evaluations"] == 2 * 3 * len(report["processed_slices"])


@needs_shared_data
def test_shipped_model_separates_infected_slices_of_ctmd_p001(tmp_path):
    """Short settings (K = 1, 5 steps) for speed on CI's 2 cores; the reported figure comes from `sacdiff evaluate`
    at the model's own settings (Resources/results)."""
    from SACDiffLib.experiments.evaluate import score_case
    from SACDiffLib.detect import detect_volume

    cfg, model, diffusion, _ = load_checkpoint(MODEL)
    cfg = derive(cfg, detect={"ensemble": 1, "sampling_steps": 5})
    result = detect_volume(SHARED_DATA / "ct" / "ctmd_P001_ct.nii.gz", model, diffusion, cfg,
                           SHARED_DATA / "ct" / "ctmd_P001_lung.nii.gz")
    labels = json.loads((SHARED_DATA / "cases.json").read_text())["ctmd_P001"]["slice_label_infection"]
    assert score_case(result, None, labels)["slice_auroc"] > 0.7
