"""Training: checkpoints, resume, determinism, and 2-process DistributedDataParallel on CPU (gloo)."""

import os
import subprocess
import sys

import pytest
import torch

from SACDiffLib.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint, build
from SACDiffLib.config import derive, from_dict, preset, to_dict
from SACDiffLib.errors import SACDiffError
from SACDiffLib.train import cosine_lr, load_training_slices, train


def _cfg(steps=4):
    return derive(preset("tiny"), train={"steps": steps})


def test_config_round_trip():
    for name in ("paper", "fast", "tiny"):
        cfg = preset(name)
        assert from_dict(to_dict(cfg)) == cfg


def test_checkpoint_stores_config_preprocessing_and_noise_convention(tmp_path):
    cfg = _cfg()
    model, _ = build(cfg)
    path = save_checkpoint(tmp_path / "c.pt", cfg, model)
    payload = read_checkpoint(path)
    assert payload["format_version"] == 1
    assert payload["preprocessing"]["hu_min"] == -1350.0 and payload["preprocessing"]["image_size"] == 32
    assert payload["noise"]["normalise"] is True and payload["noise"]["kind"] == "simplex"
    cfg2, model2, diffusion, _ = load_checkpoint(path)
    assert cfg2 == cfg
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)


def test_format_version_mismatch_is_refused(tmp_path):
    cfg = _cfg()
    path = save_checkpoint(tmp_path / "c.pt", cfg, build(cfg)[0])
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = 99
    torch.save(payload, path)
    with pytest.raises(SACDiffError, match="format 99"):
        read_checkpoint(path)


def test_training_slices_use_normal_cases_only_unless_asked(data_dir):
    images, masks, used = load_training_slices(data_dir, _cfg())
    assert [u[0] for u in used] == ["normal_a", "normal_b"]
    assert images.shape[1:] == (1, 32, 32) and images.min() >= -1 and images.max() <= 1
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    _, _, used2 = load_training_slices(data_dir, _cfg(), include_uninfected_slices=True)
    assert "sick" in [u[0] for u in used2]


def test_cosine_schedule():
    tc = _cfg(100).train
    assert cosine_lr(0, tc) == 1.0 and cosine_lr(50, tc) == pytest.approx(0.5) and cosine_lr(100, tc) == 0.0


def test_same_seed_same_losses_and_resume_continues_identically(data_dir, tmp_path):
    full = train(_cfg(6), data_dir, tmp_path / "full.pt")
    train(_cfg(6), data_dir, tmp_path / "again.pt")
    losses_full = read_checkpoint(tmp_path / "full.pt")["train_state"]["losses"]
    assert losses_full == read_checkpoint(tmp_path / "again.pt")["train_state"]["losses"]
    assert full["steps"] == 6
    # Stop after 3 of 6 steps (as Ctrl-C or a cancel would), then resume: the same 6 losses as the full run.
    train(_cfg(6), data_dir, tmp_path / "half.pt", progress=lambda fraction, message: fraction < 3 / 6)
    assert read_checkpoint(tmp_path / "half.pt")["train_state"]["step"] == 3
    train(_cfg(), data_dir, tmp_path / "resumed.pt", resume=tmp_path / "half.pt")
    resumed = read_checkpoint(tmp_path / "resumed.pt")["train_state"]
    assert resumed["step"] == 6
    assert resumed["losses"] == pytest.approx(losses_full, abs=1e-5)


def test_resume_keeps_the_cases_it_trained_on_and_refuses_other_data(data_dir, tmp_path):
    # A training on normal_b alone (named, as --normal-cases does), stopped after 2 of 4 steps and resumed without
    # naming its cases again: it goes on with normal_b (the recorded slices), as the uninterrupted run did.
    only_b = ["normal_b"]
    train(_cfg(4), data_dir, tmp_path / "full.pt", normal_cases=only_b)
    train(_cfg(4), data_dir, tmp_path / "half.pt", normal_cases=only_b,
          progress=lambda fraction, message: fraction < 2 / 4)
    train(_cfg(4), data_dir, tmp_path / "resumed.pt", resume=tmp_path / "half.pt")
    full, resumed = (read_checkpoint(tmp_path / f"{n}.pt") for n in ("full", "resumed"))
    assert [case for case, _ in resumed["extra"]["training_data"]] == only_b
    assert resumed["train_state"]["losses"] == pytest.approx(full["train_state"]["losses"], abs=1e-5)
    # other data than the checkpoint's: one line naming both, nothing written
    with pytest.raises(SACDiffError, match=r"trained on normal_b \(\d+ slices\), but .* gives normal_a"):
        train(_cfg(4), data_dir, tmp_path / "other.pt", resume=tmp_path / "half.pt",
              normal_cases=["normal_a", "normal_b"])
    assert not (tmp_path / "other.pt").exists()


def test_loss_decreases_on_a_small_problem(data_dir, tmp_path):
    cfg = derive(_cfg(60), train={"lr": 2e-3, "augment": False})
    train(cfg, data_dir, tmp_path / "m.pt")
    losses = read_checkpoint(tmp_path / "m.pt")["train_state"]["losses"]
    assert sum(losses[-15:]) / 15 < 0.8 * sum(losses[:15]) / 15


def test_two_process_ddp_training_with_gloo(data_dir, tmp_path):
    out = tmp_path / "ddp.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    from conftest import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
           "-m", "SACDiffLib.cli", "train", "--data", str(data_dir), "--out", str(out), "--preset", "tiny",
           "--steps", "3", "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert proc.returncode == 0, proc.stderr[:3000]
    extra = read_checkpoint(out)["extra"]
    assert extra["world_size"] == 2 and extra["ranks_in_sync"] is True and extra["steps_done"] == 3


def test_slim_checkpoint_keeps_the_network_in_half_precision(tiny_checkpoint, tmp_path):
    """The shipped form: EMA weights in float16; it loads through the same checks and predicts like the original
    within float16 rounding."""
    import torch

    from SACDiffLib.checkpoint import load_checkpoint, read_checkpoint, slim_checkpoint

    slim = slim_checkpoint(tiny_checkpoint, tmp_path / "slim.pt")
    payload = read_checkpoint(slim)
    assert payload["ema"] is None and payload["train_state"] is None
    assert all(v.dtype == torch.float16 for v in payload["model"].values() if v.is_floating_point())
    cfg, model, _, _ = load_checkpoint(tiny_checkpoint)
    _, small, _, _ = load_checkpoint(slim)
    x = torch.randn(2, 1, 32, 32)
    c = torch.ones_like(x)
    t = torch.tensor([5, 50])
    with torch.no_grad():
        torch.testing.assert_close(small(x, c, t), model(x, c, t), rtol=2e-2, atol=2e-2)
    assert slim.stat().st_size < tiny_checkpoint.stat().st_size


def test_normal_cases_option_names_the_healthy_training_cases(data_dir):
    from SACDiffLib.config import preset
    from SACDiffLib.errors import SACDiffError
    from SACDiffLib.train import load_training_slices

    cfg = preset("tiny")
    _, _, used = load_training_slices(data_dir, cfg)
    assert [u[0] for u in used] == ["normal_a", "normal_b"]  # diagnosis exactly "normal"
    _, _, used = load_training_slices(data_dir, cfg, normal_cases=["normal_b"])
    assert [u[0] for u in used] == ["normal_b"]
    with pytest.raises(SACDiffError, match="does not list"):
        load_training_slices(data_dir, cfg, normal_cases=["nope"])


def test_slim_sets_the_chosen_detection_defaults_and_checks_them(tiny_checkpoint, tmp_path, capsys):
    from SACDiffLib.checkpoint import load_checkpoint
    from SACDiffLib.cli import main

    out = tmp_path / "chosen.pt"
    assert main(["slim", str(tiny_checkpoint), "--out", str(out), "--steps", "7", "--sampling-steps", "3",
                 "--ensemble", "2", "--lambda", "1.5", "--background", "lung-shell", "--vessel-suppression",
                 "--precision", "bf16"]) == 0
    cfg, *_ = load_checkpoint(out)
    assert (cfg.detect.steps, cfg.detect.sampling_steps, cfg.detect.ensemble, cfg.detect.lam,
            cfg.detect.background, cfg.detect.vessel_suppression, cfg.detect.precision) == \
        (7, 3, 2, 1.5, "lung-shell", True, "bf16")
    cfg, *_ = load_checkpoint(tiny_checkpoint)
    assert cfg.detect.background == "body"  # a new training's default: Section 2.4's region
    assert not cfg.detect.vessel_suppression and cfg.detect.precision == "auto"
    assert main(["slim", str(tiny_checkpoint), "--out", str(tmp_path / "bad.pt"), "--sampling-steps", "50"]) == 2
    assert "out of range" in capsys.readouterr().err and not (tmp_path / "bad.pt").exists()


@pytest.mark.parametrize("context", [0, 1])
def test_eight_bit_training_slices_are_the_slices_as_8_bit_pictures(data_dir, context):
    """``eight_bit``: row for row the training slices (neighbours included) of the volume whose every slice went
    through ``eight_bit_slice`` — made here by hand from the whole volume, where training converts only the slices
    it reads (how close an 8-bit picture comes back to HU is ``test_eight_bit_slice_is_read_back_like_a_medseg_picture``)."""
    import numpy as np

    from SACDiffLib import io
    from SACDiffLib.data import case_path
    from SACDiffLib.experiments.validate import eight_bit_slice

    cfg = derive(_cfg(), model={"context_slices": context})
    plain, masks, used = load_training_slices(data_dir, cfg)
    eight, masks8, used8 = load_training_slices(data_dir, cfg, eight_bit=True)
    assert used8 == used and torch.equal(masks8, masks)
    row = 0
    for name, z in used:
        ct = io.read_ct(case_path(data_dir, name, "ct"))
        hu = io.ct_array(ct)
        lung = io.read_mask(case_path(data_dir, name, "lung"), ct)
        by_hand = np.stack([eight_bit_slice(s) for s in hu])
        offset = io.neighbour_offset(ct.GetSpacing()[2], cfg.model.context_mm)
        expected = io.model_inputs(by_hand, lung, cfg.preprocess, np.array(z), offset, context)[0]
        assert torch.equal(eight[row:row + len(z)], expected)
        row += len(z)
    assert not torch.equal(eight, plain)


def test_eight_bit_fraction_trains_on_the_pictures_and_zero_keeps_the_batches(data_dir, tmp_path):
    base = train(_cfg(3), data_dir, tmp_path / "base.pt")
    off = train(derive(_cfg(3), train={"eight_bit_fraction": 0.0}), data_dir, tmp_path / "off.pt")
    on = train(derive(_cfg(3), train={"eight_bit_fraction": 1.0}), data_dir, tmp_path / "on.pt")
    losses = [read_checkpoint(tmp_path / f"{n}.pt")["train_state"]["losses"] for n in ("base", "off", "on")]
    assert losses[0] == losses[1] != losses[2] and base["steps"] == off["steps"] == on["steps"] == 3
    assert load_checkpoint(tmp_path / "on.pt")[0].train.eight_bit_fraction == 1.0
    with pytest.raises(SACDiffError, match="eight_bit_fraction"):
        derive(_cfg(), train={"eight_bit_fraction": 1.5})
