"""``config.derive``: the one way a preset or checkpoint config meets a command's options."""

import pytest

from SACDiffLib.config import ThresholdMode, choices, derive, preset
from SACDiffLib.errors import SACDiffError


def test_derive_applies_options_keeps_none_and_leaves_the_original_alone():
    base = preset("small256")
    out = derive(base, detect={"steps": 120, "lam": None, "threshold": "fixed", "fixed_threshold": 0.02},
                 diffusion={"noise": {"kind": "gaussian"}})
    assert (out.detect.steps, out.detect.threshold, out.detect.fixed_threshold) == (120, "fixed", 0.02)
    assert out.detect.lam == base.detect.lam  # None keeps the setting
    assert out.diffusion.noise.kind == "gaussian" and out.diffusion.noise.octaves == base.diffusion.noise.octaves
    assert base.detect.steps != 120 and base.diffusion.noise.kind == "simplex"  # a new config; the preset unchanged


@pytest.mark.parametrize("sections, message", [
    ({"detect": {"stepz": 3}}, "unknown setting(s) config.detect.stepz"),
    ({"detekt": {"steps": 3}}, "unknown config section(s) detekt"),
    ({"detect": {"threshold": "otsu"}}, "choose one of: adaptive, fixed"),
    ({"detect": {"steps": 400}}, "exceed the largest timestep"),  # small256 trains on t ≤ 350 only
    ({"detect": {"lam": float("nan")}}, "non-finite"),
])
def test_derive_refuses_what_validate_refuses(sections, message):
    with pytest.raises(SACDiffError, match=message.replace("(", r"\(").replace(")", r"\)")):
        derive(preset("small256"), **sections)


def test_choices_come_from_the_literal_types():
    assert choices(ThresholdMode) == ("adaptive", "fixed")


def test_a_runs_detect_settings_are_read_strictly():
    from dataclasses import asdict

    from SACDiffLib.config import detect_from_dict

    det = preset("small256").detect
    assert detect_from_dict(asdict(det)) == det
    old = {k: v for k, v in asdict(det).items() if k != "exclude_airways"}  # written before that field existed
    assert detect_from_dict(old).exclude_airways is True
    with pytest.raises(SACDiffError, match="unknown fields: \\['stepz'\\]"):
        detect_from_dict({**asdict(det), "stepz": 1})
    with pytest.raises(SACDiffError, match="detect.ensemble .* = 0 is out of range"):
        detect_from_dict({**asdict(det), "ensemble": 0})
    with pytest.raises(SACDiffError, match="non-finite"):
        detect_from_dict({**asdict(det), "lam": float("inf")})


def test_harmonise_steps_and_shift_tolerance_are_range_checked():
    from SACDiffLib.config import derive, preset

    cfg = preset("tiny")  # T_s 10, every step: 10 reverse steps, the last never harmonised
    assert derive(cfg, detect={"harmonise_steps": 9}).detect.harmonise_steps == 9
    with pytest.raises(SACDiffError, match="harmonise_steps.*10 reverse steps"):
        derive(cfg, detect={"harmonise_steps": 10})
    with pytest.raises(SACDiffError, match="harmonise_steps.*4 reverse steps"):
        derive(cfg, detect={"sampling_steps": 4, "harmonise_steps": 4})
    with pytest.raises(SACDiffError, match="shift_tolerance"):
        derive(cfg, detect={"shift_tolerance": 5})
    with pytest.raises(SACDiffError, match="error_radius"):
        derive(cfg, detect={"error_radius": 9})
    assert derive(cfg, detect={"error_radius": 2}).detect.error_radius == 2


def test_every_detection_setting_is_offered_once_or_named_as_not_offered():
    """One definition per detection option (config.DETECT_OPTIONS): each DetectConfig field is either an entry there
    — and then a flag of `detect` and `evaluate` whose value reaches derive() unchanged — or deliberately not on the
    command line. A new field that is neither fails here."""
    import dataclasses

    from SACDiffLib.cli import build_parser
    from SACDiffLib.config import DETECT_OPTIONS, DetectConfig, detect_overrides

    not_offered = {"crf_iterations", "morphology_radius"}  # the paper's fixed post-processing
    fields = {f.name for f in dataclasses.fields(DetectConfig)}
    offered = [o.field for o in DETECT_OPTIONS]
    assert len(offered) == len(set(offered)) and set(offered) | not_offered == fields
    for command in ("detect", "evaluate"):
        head = ["detect", "ct.nii.gz", "--out", "o"] if command == "detect" else ["evaluate", "--cases", "c",
                                                                                  "--out", "o"]
        args = build_parser().parse_args(head + ["--harmonise-steps", "3", "--no-crop", "--lambda", "2.5",
                                                 "--threshold", "fixed", "--shift-tolerance", "1"])
        assert detect_overrides(args) == {"harmonise_steps": 3, "crop_to_lung": False, "lam": 2.5,
                                          "threshold": "fixed", "shift_tolerance": 1}
        assert detect_overrides(build_parser().parse_args(head)) == {}  # nothing given: the model's own settings


def test_detect_arguments_is_the_inverse_of_the_parser_for_every_option():
    """What a front end sends (``detect_arguments``, used by the Slicer module) parses back to the same settings,
    for every entry of DETECT_OPTIONS: a new option needs no edit on the Slicer side to be sent."""
    from typing import Literal, get_args, get_origin

    from SACDiffLib.cli import build_parser
    from SACDiffLib.config import DETECT_OPTIONS, detect_arguments, detect_option_type, detect_overrides

    sample = {}
    for option in DETECT_OPTIONS:
        kind = detect_option_type(option)
        sample[option.field] = (False if kind is bool else get_args(kind)[-1] if get_origin(kind) is Literal
                                else 0.1 + 1 / 3 if kind is float else 3)
    head = ["detect", "ct.nii.gz", "--out", "o"]
    assert detect_overrides(build_parser().parse_args(head + detect_arguments(sample))) == sample
    assert detect_arguments({"crf": True, "lam": 2.5}) == ["--crf", "--lambda", "2.5"]
    with pytest.raises(SACDiffError, match="'crf_iterations' is not a detection option"):
        detect_arguments({"crf_iterations": 3})
