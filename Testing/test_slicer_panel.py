"""The panel driven the way Slicer 5.12.3 and 5.8.0 drive it (``slicer_panel.py``: Slicer's own parameterNodeWrapper,
ScriptedLoadableModule, i18n and util at those tags on slicer-core's real MRML; PythonQt and the CTK / qMRML widgets
emulated in ``pythonqt_emulation.py``)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_chest

slicer = pytest.importorskip("slicer", reason="slicer-core (real MRML) is not installed; pip install -e .[test]")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package is not slicer-core", allow_module_level=True)

from pythonqt_emulation import SLOT_ERRORS  # noqa: E402
from slicer_panel import SLICER_PYTHON, TAGS, Panel, slicer_release  # noqa: E402

if not SLICER_PYTHON.is_dir():
    pytest.skip(f"{SLICER_PYTHON} is absent (Slicer's own Python sources, ../shared); the panel tests need them",
                allow_module_level=True)

SPACING = (1.5, 1.5, 2.5)
IJK_TO_RAS = np.array([[-SPACING[0], 0, 0, 40.0], [0, -SPACING[1], 0, 55.0], [0, 0, SPACING[2], -120.0], [0, 0, 0, 1]])


@pytest.fixture(params=TAGS)
def release(request, tmp_path):
    with slicer_release(request.param, tmp_path) as r:
        yield r


def _add_ct_and_lung(release, labelmap=True):
    import slicer

    hu, labels, _ = make_chest(64, 12, 3, True)
    ct = slicer.util.addVolumeFromArray(hu.astype(np.int16), IJK_TO_RAS, "chest CT")
    lung = slicer.util.addVolumeFromArray(labels.astype(np.uint8), IJK_TO_RAS, "lung", "vtkMRMLLabelMapVolumeNode")
    return ct, lung


def test_the_panel_opens(release):
    panel = Panel(release)
    assert panel.ui.presetComboBox.currentText == "model"
    assert panel.parameters.preset == "model"


class _Sent(Exception):
    """Raised by the recording stand-in of startDetection: the command was captured, no process started."""


def _apply_and_capture(panel):
    """Press Apply; return the `sacdiff detect` command the panel would start (the process itself is not started)."""
    logic = panel.widget.logic
    sent = []

    def record(ctNode, lungNode, **options):
        sent.append(logic.detectionCommand("CT", "LUNG", "RUN", **options))
        raise _Sent()

    logic.startDetection = record
    panel.ui.applyButton.click()
    assert sent, panel.dialogs
    panel.dialogs.clear()  # the "could not start" box of the stand-in's exception
    SLOT_ERRORS.clear()
    return sent[0]


def _option(command, name):
    return command[command.index(name) + 1] if name in command else None


def test_1_the_paper_preset_can_be_selected(release):
    panel = Panel(release)
    _add_ct_and_lung(release)
    panel.ui.presetComboBox.choose("paper")
    assert panel.ui.presetComboBox.currentText == "paper"
    assert panel.parameters.preset == "paper"
    assert (panel.parameters.ensemble, panel.parameters.steps, panel.parameters.samplingSteps) == (7, 550, 0)
    panel.ui.presetComboBox.choose("model")
    assert panel.ui.presetComboBox.currentText == "model" and panel.parameters.preset == "model"
    command = _apply_and_capture(panel)
    assert _option(command, "--steps") is None and _option(command, "--sampling-steps") is None


def test_1b_the_solid_lesions_preset_sends_its_profile_and_not_the_panels_lambda(release):
    """The profile carries its own λ and α region (config.DETECT_PROFILES): the panel sends --profile and no λ, K or
    T_s of its own until the user moves the slider."""
    from SACDiffLib.config import DETECT_PROFILES

    panel = Panel(release)
    ct, lung = _add_ct_and_lung(release)
    panel.parameters.inputVolume, panel.parameters.lungMask = ct, lung
    panel.ui.presetComboBox.choose("solid lesions")
    assert panel.parameters.preset == "solid lesions"
    command = _apply_and_capture(panel)
    assert _option(command, "--profile") == "solid-lesions" and "solid-lesions" in DETECT_PROFILES
    for name in ("--lambda", "--steps", "--ensemble", "--sampling-steps"):
        assert _option(command, name) is None, (name, command)
    panel.ui.lambdaSlider.drag(2.0, 3.0)
    assert _option(_apply_and_capture(panel), "--lambda") == "3.0"
    panel.ui.presetComboBox.choose("model")
    assert _option(_apply_and_capture(panel), "--profile") is None


def test_2_a_fresh_panel_sends_the_models_own_settings(release):
    panel = Panel(release)
    ct, lung = _add_ct_and_lung(release)
    panel.parameters.inputVolume, panel.parameters.lungMask = ct, lung
    command = _apply_and_capture(panel)
    for name in ("--ensemble", "--steps", "--sampling-steps", "--lambda"):
        assert _option(command, name) is None, (name, command)


def test_3_after_a_scene_close_the_models_lambda_is_kept(release):
    panel = Panel(release)
    widget = panel.widget
    widget._showingResult = True  # as _showResults does: a run with the model's λ 12 was shown
    panel.parameters.lam = 12.0
    widget._showingResult, widget._lambdaTouched = False, False
    assert panel.ui.lambdaSlider.value == 12.0
    panel.close_scene()  # the new parameter node's default λ is written into the slider by the wrapper
    ct, lung = _add_ct_and_lung(release)
    panel.parameters.inputVolume, panel.parameters.lungMask = ct, lung
    command = _apply_and_capture(panel)
    assert _option(command, "--lambda") is None, command
    panel.ui.lambdaSlider.drag(2.0, 3.0)  # the user's own λ is sent
    assert _option(_apply_and_capture(panel), "--lambda") == "3.0"


class _FinishedProcess:
    """A run that ended with exit 0 but whose folder cannot be loaded."""

    def __init__(self, run_dir):
        self.runDir, self.running, self.returncode, self.cleaned = run_dir, False, 0, 0

    def poll(self):
        return []

    def cancel(self):
        pass

    def errorMessage(self):
        return ""

    def cleanup(self):
        self.cleaned += 1


def test_4_a_failed_result_load_shows_one_dialog_and_frees_the_panel(release, tmp_path):
    panel = Panel(release)
    ct, lung = _add_ct_and_lung(release)
    panel.parameters.inputVolume, panel.parameters.lungMask = ct, lung
    process = _FinishedProcess(tmp_path / "missing-run")
    panel.widget.logic.startDetection = lambda *a, **k: process
    panel.ui.applyButton.click()
    for _ in range(5):  # five ticks of the 200 ms timer
        panel.widget._timer.fire()
    assert [kind for kind, _ in panel.dialogs] == ["error"], panel.dialogs
    assert not panel.widget._timer.isActive() and panel.widget._process is None
    assert process.cleaned == 1 and panel.ui.applyButton.text == "Apply"


def test_5_dependencies_install_through_the_releases_own_api(release, monkeypatch):
    import inspect
    import sys

    from conftest import ROOT

    monkeypatch.syspath_prepend(str(ROOT / "SACDiff"))
    from SACDiffModuleLib import dependencies

    calls = []
    if release.tag == "v5.12.3":
        import slicer.packaging as packaging

        real = packaging.pip_ensure
        monkeypatch.setattr(packaging, "pip_ensure", lambda *a, **k: calls.append(inspect.signature(real).bind(*a, **k)))
    else:
        assert "slicer.packaging" not in sys.modules
        real = release.slicer.util.pip_install
        pinned = []

        def pip_install(*a, **k):
            calls.append(inspect.signature(real).bind(*a, **k))
            words = calls[-1].arguments["requirements"]
            pinned.append(open(words[words.index("-c") + 1], encoding="utf-8").read())

        monkeypatch.setattr(release.slicer.util, "pip_install", pip_install)
    monkeypatch.setattr(dependencies, "missingDependencies", lambda: [])
    dependencies.installDependencies(["scikit-image"])
    (call,) = calls
    args = call.arguments
    if release.tag == "v5.12.3":
        assert [str(r).split(">")[0] for r in args["requirements"]] == ["scikit-image"]
        assert set(args["skip_packages"]) == {"numpy", "SimpleITK", "torch"} and args["requester"] == "SACDiff"
        assert args["prompt_install"] is False  # the panel asked the user already
    else:  # 5.8: pip with a constraints file that pins what Slicer provides at its installed versions
        assert args["requirements"][0].startswith("scikit-image")
        assert "numpy==" in pinned[0] and "SimpleITK==" in pinned[0]


def test_7_cleanup_stops_the_poll_timer(release, tmp_path):
    panel = Panel(release)
    ct, lung = _add_ct_and_lung(release)
    panel.parameters.inputVolume, panel.parameters.lungMask = ct, lung

    class Running(_FinishedProcess):
        def __init__(self, run_dir):
            super().__init__(run_dir)
            self.running, self.cancelled = True, False

        def cancel(self):
            self.cancelled = True

    process = Running(tmp_path / "run")
    panel.widget.logic.startDetection = lambda *a, **k: process
    panel.ui.applyButton.click()
    assert panel.widget._timer.isActive()
    old = panel.reload()
    assert not old._timer.isActive() and process.cancelled


def test_8_the_input_ct_selector_lists_no_label_maps(release):
    panel = Panel(release)
    ct, lung = _add_ct_and_lung(release)
    assert panel.ui.inputVolumeSelector.nodes() == [ct]


def _node_names(scene):
    return sorted(scene.GetNthNode(i).GetName() for i in range(scene.GetNumberOfNodes())
                  if scene.GetNthNode(i).IsA("vtkMRMLVolumeNode") or scene.GetNthNode(i).IsA("vtkMRMLSegmentationNode"))


def test_the_panels_whole_life(release, tiny_checkpoint, tmp_path):
    """Open the module, pick inputs and presets, Apply → progress → results, move λ and release it, Cancel mid-run,
    a failing run, scene close and reopen, module reload — each step checked on the GUI and the parameter node.
    The detection is a real `sacdiff detect` child process with the tiny test model."""
    panel = Panel(release)
    ui, scene = panel.ui, release.scene
    ct, lung = _add_ct_and_lung(release)
    assert ui.inputVolumeSelector.currentNode() is ct  # the first CT is picked, the label map is not offered
    ui.lungMaskSelector.setCurrentNode(lung)
    assert panel.parameters.inputVolume is ct and panel.parameters.lungMask is lung
    assert ui.applyButton.enabled
    ui.modelPathLineEdit.currentPath = str(tiny_checkpoint)

    ui.presetComboBox.choose("paper")
    assert (panel.parameters.preset, ui.ensembleSpinBox.value, ui.stepsSpinBox.value) == ("paper", 7, 550)
    ui.presetComboBox.choose("model")
    assert (panel.parameters.preset, ui.ensembleSpinBox.value, ui.stepsSpinBox.value) == ("model", 0, 0)

    # Apply → progress → results
    ui.applyButton.click()
    assert ui.applyButton.text == "Cancel" and ui.progressBar.visible
    panel.wait_for_run()
    assert not SLOT_ERRORS and not panel.dialogs, (SLOT_ERRORS, panel.dialogs)
    assert ui.statusLabel.text == "Done." and ui.applyButton.text == "Apply" and not ui.progressBar.visible
    assert {"Anomaly", "Anomaly map", "Uncertainty", "Pseudo-healthy"} <= set(_node_names(scene))
    summary = panel.widget.logic.summary()
    assert ui.lambdaSlider.value == pytest.approx(summary["lambda"])
    assert f"λ = {summary['lambda']:.2f}" in ui.thresholdLabel.text

    # λ dragged and released: α and the volumes follow; the next run sends the user's λ
    before = summary["alpha"]
    ui.lambdaSlider.drag(summary["lambda"] + 2.0, summary["lambda"] + 4.0)
    after = panel.widget.logic.summary()
    assert after["lambda"] == pytest.approx(summary["lambda"] + 4.0) and after["alpha"] > before
    assert f"λ = {after['lambda']:.2f}" in ui.thresholdLabel.text and panel.widget._lambdaTouched

    # Cancel mid-run: the scene is unchanged, the work folder gone
    nodes = _node_names(scene)
    panel.parameters.steps, panel.parameters.samplingSteps, panel.parameters.ensemble = 100, 0, 16
    ui.applyButton.click()
    process = panel.widget._process
    ui.applyButton.click()  # "Cancel"
    assert panel.widget._process is None and ui.applyButton.text == "Apply"
    assert "Cancelled" in ui.statusLabel.text and _node_names(scene) == nodes
    assert not process.workDir.exists() and not panel.widget._timer.isActive()

    # A failing run: one dialog, the panel usable again
    broken = tmp_path / "broken.pt"
    broken.write_text("not a model")
    ui.modelPathLineEdit.currentPath = str(broken)
    ui.applyButton.click()
    panel.wait_for_run()
    assert [kind for kind, _ in panel.dialogs] == ["error"] and "Detection failed" in panel.dialogs[0][1]
    assert ui.applyButton.enabled and ui.applyButton.text == "Apply"
    panel.dialogs.clear()

    # Scene close and reopen: a fresh parameter node; nothing the user touched carries over
    panel.close_scene()
    assert panel.parameters is not None and panel.parameters.preset == "model"
    assert not panel.widget._lambdaTouched and not ui.applyButton.enabled
    ct2, lung2 = _add_ct_and_lung(release)
    panel.parameters.inputVolume, panel.parameters.lungMask = ct2, lung2
    assert _option(_apply_and_capture(panel), "--lambda") is None

    # Module reload: the old panel stops, the new one works on the same scene
    old = panel.reload()
    assert not old._timer.isActive()
    assert panel.parameters.inputVolume is ct2 and ui is not panel.ui
    assert not SLOT_ERRORS, SLOT_ERRORS


def test_sacdifftest_reload_and_test_runs_its_panel_sequence(release, tiny_checkpoint):
    """The module's own SACDiffTest (what Reload and Test runs inside Slicer) passes its panel sequence here, on the
    tiny model (the shipped one inside Slicer)."""
    panel = Panel(release)
    test = panel.module.SACDiffTest()
    test.delayDisplay = lambda *a, **k: None  # no dialogs without the application
    test.setUp = lambda: release.scene.Clear(0)
    test.setUp()
    test.test_SACDiffPanel(widget=panel.widget, modelPath=str(tiny_checkpoint))
    assert not SLOT_ERRORS, SLOT_ERRORS


def test_the_panel_shows_the_models_lambda_and_where_it_came_from(release, tmp_path, data_dir, tiny_checkpoint):
    """Shipped model: λ from validation; a calibrated copy: λ and the site's calibration (read by `sacdiff info` in
    a child process — no torch in Slicer's)."""
    from SACDiffLib.cli import main

    from SACDiffLib.checkpoint import read_checkpoint, shipped_model_path

    # the shipped model's own λ (24 for the 2.5D default)
    shipped = f"Model λ = {read_checkpoint(shipped_model_path())['config']['detect']['lam']:g}:"
    panel = Panel(release)
    assert panel.ui.modelLambdaLabel.text.startswith(shipped) and "validate" in panel.ui.modelLambdaLabel.text
    scans = tmp_path / "site"
    scans.mkdir()
    for kind in ("ct", "lung"):
        (scans / f"normal_a_{kind}.nii.gz").write_bytes((data_dir / "ct" / f"normal_a_{kind}.nii.gz").read_bytes())
    calibrated = tmp_path / "site.pt"
    assert main(["calibrate", "--model", str(tiny_checkpoint), "--scans", str(scans), "--target", "2",
                 "--out", str(calibrated)]) == 0
    panel.ui.modelPathLineEdit.currentPath = str(calibrated)
    assert "calibrated on 1 healthy scan(s) of this site" in panel.ui.modelLambdaLabel.text
    panel.ui.modelPathLineEdit.currentPath = str(data_dir / "cases.json")
    assert panel.ui.modelLambdaLabel.text.startswith("Not a usable model")
