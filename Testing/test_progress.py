"""One progress signature, progress(fraction, message) -> bool, for training, detection and their drivers."""

import pytest

from SACDiffLib.progress import ProgressLines, keep_going, part
from SACDiffLib.protocol import parse_progress


def test_parts_map_their_own_fraction_onto_their_share():
    seen = []
    whole = lambda f, m: seen.append((f, m)) or True  # noqa: E731
    third = part(whole, 2, 4, "case_b")  # the third of four equal parts covers 0.5 .. 0.75
    assert third(0.0, "start") and third(0.5, "half")
    assert seen == [(0.5, "case_b: start"), (0.625, "case_b: half")]
    assert part(None, 0, 3) is None and keep_going(None, 0.3, "x")  # nothing to report to: never a cancel


def test_a_cancel_passes_through_parts():
    inner = part(lambda f, m: f < 0.5, 1, 2)
    assert keep_going(inner, 0.0, "") is False  # 0.5 of the whole: the callback said stop
    assert keep_going(part(lambda f, m: None, 0, 2), 0.9, "") is True  # None is not a cancel


def test_lines_follow_the_protocol_the_slicer_module_parses(capsys):
    lines = ProgressLines()
    lines(0.25, "reverse step 1/4")
    lines(0.26, "too soon: dropped")
    lines(1.0, "done")  # the last one always shows
    out = [parse_progress(line) for line in capsys.readouterr().out.splitlines()]
    assert out == [(0.25, "reverse step 1/4"), (1.0, "done")]


def test_training_reports_fractions_of_its_steps(tmp_path, data_dir):
    from SACDiffLib.config import derive, preset
    from SACDiffLib.train import train

    seen = []
    cfg = derive(preset("tiny"), train={"steps": 4, "save_every": 0})
    train(cfg, data_dir, tmp_path / "m.pt", progress=lambda f, m: seen.append((f, m)) or True)
    assert [f for f, _ in seen] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert seen[0][1].startswith("step 1/4, loss ")


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "1e9", "-0.5", "1.0001"])
def test_progress_lines_with_a_fraction_outside_0_1_are_not_progress(text):
    assert parse_progress(f"SACDIFF_PROGRESS {text} step") is None


def test_progress_lines_at_the_ends_are_kept():
    assert parse_progress("SACDIFF_PROGRESS 0 start") == (0.0, "start")
    assert parse_progress("SACDIFF_PROGRESS 1.0000 done") == (1.0, "done")


def test_notes_leave_by_one_logger_where_the_command_line_says(capsys):
    """progress.log is the one way notes leave (issue 25 item 5): the CLI shows them as bare lines on stderr (stdout
    for the demo and the benchmark, whose notes are their output), inner jobs can be quieted, a second set-up does
    not double them."""
    from SACDiffLib.progress import log, quiet_notes, show_notes

    show_notes("stderr")
    show_notes("stderr")
    log.info("[1/2] case_a")
    with quiet_notes():
        log.info("hidden")
    log.warning("note: fell back")
    out, err = capsys.readouterr()
    assert out == "" and err == "[1/2] case_a\nnote: fell back\n"
    show_notes("stdout")
    log.info("[3/3] detecting")
    out, err = capsys.readouterr()
    assert out == "[3/3] detecting\n" and err == ""
    show_notes("stderr")
