"""SACDiff: unsupervised anomaly detection in chest CT (SAC-Diff, MIDL 2026) as a 3D Slicer module.

GUI only. The scene ↔ library work lives in ``SACDiffModuleLib/logic.py``; the method lives in ``SACDiffLib``.
"""

from __future__ import annotations

import os
from typing import Annotated, Optional, Union

import qt
import slicer
import vtk
from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from SACDiffModuleLib.logic import (
    DETECTION_PRESETS,
    PRESET_PROFILES,
    PresetTracker,
    SACDiffLogic,
)
from SACDiffModuleLib.dependencies import installDependencies, missingDependencies
from SACDiffModuleLib.process import EventKind

MODEL_SETTING = "SACDiff/ModelPath"
EXPORT_SETTING = "SACDiff/ExportFolder"



class SACDiff(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SACDiff")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["SACDiff developers"]
        self.parent.helpText = _(
            "Unsupervised anomaly detection in chest CT: a diffusion model trained on healthy lungs reconstructs a "
            "pseudo-healthy CT; the reconstruction error, thresholded per scan (mean + λ·std outside the lung), a "
            "dense CRF and morphology give the anomaly segmentation; the spread of K reconstructions is the "
            "uncertainty. Research software, not for clinical use."
        )
        self.parent.acknowledgementText = _(
            "Implements SAC-Diff (MIDL 2026). Detection runs in a separate process so Slicer stays responsive."
        )


@parameterNodeWrapper
class SACDiffParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    lungMask: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]  # a node Union must include None
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    preset: Annotated[str, Choice(list(DETECTION_PRESETS))] = "model"
    # A fresh panel is the "model" preset: 0 / −1 = the checkpoint's own K, T_s and reverse steps (its validated
    # setting), never a panel default of its own.
    ensemble: Annotated[int, WithinRange(0, 32)] = DETECTION_PRESETS["model"]["ensemble"]
    steps: Annotated[int, WithinRange(0, 1000)] = DETECTION_PRESETS["model"]["steps"]
    samplingSteps: Annotated[int, WithinRange(-1, 1000)] = DETECTION_PRESETS["model"]["samplingSteps"]
    seed: Annotated[int, WithinRange(0, 2**31 - 1)] = 0
    crf: bool = True
    lam: Annotated[float, WithinRange(-2.0, 32.0)] = 1.0


class SACDiffWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[SACDiffLogic] = None
        self._parameterNode: Optional[SACDiffParameterNode] = None
        self._parameterNodeGuiTag = None
        self._process = None
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.timeout.connect(self.onPoll)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SACDiff.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SACDiffLogic()
        self._presets = PresetTracker()
        self._lambdaTouched = False  # the user moved λ since the last result/preset: send it, else the model's own
        self._showingResult = False  # set while the slider is moved to a run's λ by the code, not by the user

        settings = qt.QSettings()
        self.ui.modelPathLineEdit.currentPath = settings.value(MODEL_SETTING, "")
        self.ui.exportDirectoryButton.directory = settings.value(EXPORT_SETTING, qt.QDir.homePath())

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.createLungButton.connect("clicked(bool)", self.onCreateLungMask)
        self.ui.exportButton.connect("clicked(bool)", self.onExport)
        self.ui.presetComboBox.connect("currentIndexChanged(int)", self.onPresetChanged)
        # While the slider is dragged only the threshold moves (no CRF, fast); when it is released (valueChanged,
        # tracking off) the run's CRF setting applies once.
        self.ui.lambdaSlider.tracking = False
        self.ui.lambdaSlider.connect("valueIsChanging(double)", self.onLambdaChanging)
        self.ui.lambdaSlider.connect("valueChanged(double)", self.onLambdaChanged)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)
        self.initializeParameterNode()
        qt.QTimer.singleShot(0, self._showModelInfo)  # after the panel is shown (a child process reads the model)

    def cleanup(self) -> None:
        """Module reload or application exit: stop polling and the run (the old widget must not fire on deleted
        widgets), drop every observer."""
        self._timer.stop()
        if self._process is not None:
            self._process.cancel()
            self._process = None
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        if self._process is not None:
            self._process.cancel()
            self._process = None
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(SACDiffParameterNode(self.logic.getParameterNode()))
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = first

    def setParameterNode(self, inputParameterNode: Optional[SACDiffParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()
        if inputParameterNode is None:  # a scene close: what the user touched belonged to the old scene
            self._lambdaTouched = False
            self._presets = PresetTracker()

    def _checkCanApply(self, caller=None, event=None) -> None:
        if self._process is not None:
            return  # the button is "Cancel" while running
        ready = bool(self._parameterNode and self._parameterNode.inputVolume and self._parameterNode.lungMask)
        self.ui.applyButton.enabled = ready
        self.ui.applyButton.toolTip = _("Run detection") if ready else _("Select a CT and a lung mask")
        self.ui.createLungButton.enabled = bool(self._parameterNode and self._parameterNode.inputVolume)

    # --- dependencies ---------------------------------------------------------------------------------------------

    def ensureDependencies(self) -> bool:
        missing = missingDependencies()
        if not missing:
            return True
        if not slicer.util.confirmOkCancelDisplay(
            _("SACDiff needs these Python packages, which will be downloaded and installed now: ")
            + ", ".join(missing) + _(". PyTorch comes from the PyTorch extension (SlicerPyTorch)."),
            windowTitle=_("SACDiff: install dependencies"),
        ):
            return False
        with slicer.util.tryWithErrorDisplay(_("Installing the dependencies failed."), waitCursor=True):
            installDependencies(missing)
        return not missingDependencies()

    # --- actions --------------------------------------------------------------------------------------------------

    def onPresetChanged(self, index=None) -> None:
        """Fill K / T_s / reverse steps from the preset the user picked (the combo box's own text: the parameter
        node may not be updated yet). connectGui refills the box on every module enter; ``presetChange`` ignores
        a refill that keeps the same preset, so the user's own K / T_s survive."""
        if self._parameterNode is None:
            return
        name = self.ui.presetComboBox.currentText
        values = self._presets.change(name)
        if values is not None:
            self._lambdaTouched = False
            # This slot runs before the wrapper's own (it was connected first): write the preset itself first, in
            # one modification, or the wrapper pushes the old preset back into the box when K changes.
            with slicer.util.NodeModify(self._parameterNode):
                self._parameterNode.preset = name
                self._parameterNode.ensemble = values["ensemble"]
                self._parameterNode.steps = values["steps"]
                self._parameterNode.samplingSteps = values["samplingSteps"]

    def onModelPathChanged(self, path) -> None:
        qt.QSettings().setValue(MODEL_SETTING, path)
        self._showModelInfo()

    def _showModelInfo(self) -> None:
        """Which λ the model carries and where it came from (validation, or calibration on this site's scans)."""
        path = self.ui.modelPathLineEdit.currentPath
        try:
            info = self.logic.modelInfo(path)
        except Exception as exc:  # not a model (yet): say so where the λ would be
            self.ui.modelLambdaLabel.text = _("Not a usable model: {error}").format(error=exc)
            return
        self.ui.modelLambdaLabel.text = _("Model λ = {lam:g}: {source}").format(lam=info["lambda"],
                                                                                 source=info["lambda_source"])

    def onApplyButton(self) -> None:
        if self._process is not None:  # the button says Cancel
            self._process.cancel()
            self._finish(_("Cancelled; the scene is unchanged."))
            return
        if not self.ensureDependencies():
            return
        p = self._parameterNode
        if p.device == "cuda":
            if not self.logic.cudaAvailable():
                if not slicer.util.confirmOkCancelDisplay(
                    _("PyTorch sees no CUDA GPU on this computer. Run on the CPU instead (slower)?")
                ):
                    return
                p.device = "cpu"
        profile = PRESET_PROFILES.get(p.preset, "")
        ownLambda = p.preset == "model" or profile  # the model's or the profile's λ unless the user moved it
        with slicer.util.tryWithErrorDisplay(_("Could not start detection."), waitCursor=True):
            self._process = self.logic.startDetection(
                p.inputVolume, p.lungMask, modelPath=self.ui.modelPathLineEdit.currentPath, device=p.device,
                ensemble=p.ensemble, steps=p.steps, samplingSteps=p.samplingSteps, seed=p.seed, crf=p.crf,
                lam=p.lam if self._lambdaTouched or not ownLambda else None, profile=profile,
            )
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.enabled = True
            self.ui.progressBar.visible = True
            self.ui.progressBar.value = 0
            self.ui.logTextEdit.clear()
            self.ui.statusLabel.text = _("Starting…")
            self._timer.start()

    def onPoll(self) -> None:
        process = self._process
        if process is None:
            self._timer.stop()
            return
        for event in process.poll():
            if event.kind is EventKind.PROGRESS:
                self.ui.progressBar.value = int(round(100 * event.fraction))
                self.ui.statusLabel.text = event.message
            elif event.kind is EventKind.LOG:
                self.ui.logTextEdit.appendPlainText(event.message)
        if process.running:
            return
        if process.returncode != 0:
            message = process.errorMessage()
            process.cleanup()
            self._finish(_("Detection failed."))
            if "out of memory" in message.lower():
                message += _("\n\nThe GPU ran out of memory: choose Device = cpu, or a smaller ensemble K.")
            slicer.util.errorDisplay(_("Detection failed: ") + message)
            return
        self._timer.stop()  # before any dialog: tryWithErrorDisplay shows its box, then re-raises
        try:
            with slicer.util.tryWithErrorDisplay(_("Could not load the results."), waitCursor=True):
                self.logic.loadResults(self._parameterNode.inputVolume, process.runDir)
                self._showResults()
        except Exception:  # already shown in the error box
            process.cleanup()  # the run cannot be used: its work folder goes
            self._finish(_("Loading the results failed."))
            return
        self._finish(_("Done."))

    def _finish(self, message: str) -> None:
        self._timer.stop()
        self._process = None
        self.ui.applyButton.text = _("Apply")
        self.ui.progressBar.visible = False
        self.ui.statusLabel.text = message
        self._checkCanApply()

    def _showResults(self) -> None:
        nodes = self.logic.outputNodes
        self._showingResult = True  # the slider follows the run's λ; not a user's move
        try:
            self._parameterNode.lam = self.logic.summary()["lambda"]
        finally:
            self._showingResult = False
        self._lambdaTouched = False
        slicer.util.setSliceViewerLayers(background=self._parameterNode.inputVolume, foreground=nodes["anomaly_map"],
                                         foregroundOpacity=0.4)
        self.ui.exportButton.enabled = True
        self._showSummary(self.logic.summary())

    def _showSummary(self, s: dict) -> None:
        self.ui.thresholdLabel.text = f"{s['alpha']:.4g}  (λ = {s['lambda']:.2f})"
        self.ui.volumeLabel.text = _("{total:.1f} ml ({pct:.2f} % of lung) — right {r:.1f} ml ({rp:.2f} %), left "
                                     "{l:.1f} ml ({lp:.2f} %)").format(
            total=s["anomaly_ml"], pct=s["anomaly_percent"], r=s["right_ml"], rp=s["right_percent"],
            l=s["left_ml"], lp=s["left_percent"])

    def onLambdaChanging(self, value: float) -> None:
        self._rethreshold(value, crf=False)

    def onLambdaChanged(self, value: float) -> None:
        # ctkSliderWidget emits valueChanged for programmatic writes too (the wrapper writing the parameter node's
        # λ into the GUI, a result's λ). Those arrive with the node already holding the value; a user's move
        # arrives first here (this slot was connected before the wrapper's), while the node still holds the old λ.
        p = self._parameterNode
        if not self._showingResult and p is not None and abs(p.lam - value) > 1e-9:
            self._lambdaTouched = True
        self._rethreshold(value, crf=self._parameterNode.crf if self._parameterNode else None)

    def _rethreshold(self, value: float, crf) -> None:
        if self.logic is None or self.logic.result is None:
            return
        with slicer.util.tryWithErrorDisplay(_("Re-thresholding failed.")):
            self._showSummary(self.logic.setLambda(value, crf=crf))

    def onCreateLungMask(self) -> None:
        if not self.ensureDependencies():
            return
        with slicer.util.tryWithErrorDisplay(_("Creating the lung mask failed."), waitCursor=True):
            node = self.logic.createLungSegmentation(self._parameterNode.inputVolume,
                                                     learned=self.ui.learnedLungCheckBox.checked)
            self._parameterNode.lungMask = node

    def onExport(self) -> None:
        folder = os.path.join(self.ui.exportDirectoryButton.directory,
                              f"{self._parameterNode.inputVolume.GetName()}-SACDiff")
        qt.QSettings().setValue(EXPORT_SETTING, self.ui.exportDirectoryButton.directory)
        with slicer.util.tryWithErrorDisplay(_("Export failed."), waitCursor=True):
            files = self.logic.exportResults(folder)
            self.ui.statusLabel.text = _("Exported {n} files to {folder}").format(n=len(files), folder=folder)


class SACDiffTest(ScriptedLoadableModuleTest):
    """Reload and Test inside Slicer (Developer mode): the logic on a small synthetic chest, then the panel's life as
    a radiologist lives it — pick inputs and presets, Apply → progress → results, move λ, Cancel mid-run, close the
    scene. CI runs the same sequence on Slicer's own Python with the widgets emulated (Testing/test_slicer_panel.py);
    this one checks a real installation with one click."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SACDiffOnSyntheticChest()
        self.setUp()
        self.test_SACDiffPanel()

    def _syntheticChest(self, name="phantom CT"):
        import numpy as np

        from SACDiffLib.experiments.phantom import chest_phantom

        hu, lungs, lesion, spacing = chest_phantom(size=128, slices=24, kind="covid", seed=0)
        ijkToRAS = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
        return slicer.util.addVolumeFromArray(hu, ijkToRAS, name)

    def test_SACDiffOnSyntheticChest(self):
        import tempfile
        import time

        self.delayDisplay("Creating a synthetic chest CT")
        ct = self._syntheticChest()
        logic = SACDiffLogic()
        lung = logic.createLungSegmentation(ct)
        self.delayDisplay("Running detection with the shipped model (fast settings)")
        process = logic.startDetection(ct, lung, device="auto", ensemble=2, samplingSteps=10)
        while process.running:
            process.poll()
            slicer.app.processEvents()
            time.sleep(0.1)
        self.assertEqual(process.returncode, 0, process.errorMessage())
        nodes = logic.loadResults(ct, process.runDir)
        self.assertEqual(nodes["anomaly_map"].GetImageData().GetDimensions(), ct.GetImageData().GetDimensions())
        before = logic.summary()["anomaly_ml"]
        after = logic.setLambda(3.0, crf=False)["anomaly_ml"]
        self.assertLessEqual(after, before + 1e-9)
        with tempfile.TemporaryDirectory() as folder:
            files = logic.exportResults(os.path.join(folder, "export"))
            self.assertTrue(any(f.name == "anomaly.seg.nrrd" for f in files))
        self.delayDisplay("Logic test passed")

    def test_SACDiffPanel(self, widget=None, modelPath: str = ""):
        """The panel as a user drives it. ``widget`` and ``modelPath`` let a harness pass its own panel and a small
        model; inside Slicer they are the module's panel and the shipped model."""
        import time

        if widget is None:
            slicer.util.selectModule("SACDiff")
            widget = slicer.modules.sacdiff.widgetRepresentation().self()
        ui = widget.ui
        ct = self._syntheticChest()
        lung = widget.logic.createLungSegmentation(ct)
        ui.inputVolumeSelector.setCurrentNode(ct)
        ui.lungMaskSelector.setCurrentNode(lung)
        ui.modelPathLineEdit.currentPath = modelPath
        self.assertTrue(ui.applyButton.enabled)
        ui.presetComboBox.setCurrentIndex(ui.presetComboBox.findText("paper"))
        self.assertEqual((widget._parameterNode.preset, ui.stepsSpinBox.value), ("paper", 550))
        ui.presetComboBox.setCurrentIndex(ui.presetComboBox.findText("model"))
        self.assertEqual((widget._parameterNode.preset, ui.stepsSpinBox.value), ("model", 0))
        widget._parameterNode.ensemble = 2

        self.delayDisplay("Apply: detection in a separate process")
        ui.applyButton.click()
        self.assertEqual(ui.applyButton.text, "Cancel")
        start = time.monotonic()
        while widget._process is not None and time.monotonic() - start < 600:
            widget.onPoll()
            slicer.app.processEvents()
            time.sleep(0.1)
        self.assertEqual(ui.statusLabel.text, "Done.")
        summary = widget.logic.summary()
        self.assertAlmostEqual(ui.lambdaSlider.value, summary["lambda"], places=6)

        self.delayDisplay("λ moved by the user")
        ui.lambdaSlider.value = summary["lambda"] + 4.0
        moved = widget.logic.summary()
        self.assertAlmostEqual(moved["lambda"], summary["lambda"] + 4.0, places=6)
        self.assertGreater(moved["alpha"], summary["alpha"])

        self.delayDisplay("Cancel mid-run: the scene is unchanged")
        nodes = slicer.mrmlScene.GetNumberOfNodes()
        ui.applyButton.click()
        ui.applyButton.click()
        self.assertIsNone(widget._process)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodes)

        self.delayDisplay("Scene close: a fresh panel")
        slicer.mrmlScene.Clear()
        self.assertEqual(widget._parameterNode.preset, "model")
        self.assertFalse(widget._lambdaTouched)
        self.delayDisplay("Panel test passed")
