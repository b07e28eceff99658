"""SACDiff module logic: moves data between the MRML scene and SACDiffLib. No algorithm lives here.

Detection runs in a child process (``process.DetectionProcess``); the scene is touched only when a finished run
folder is loaded (``loadResults``), so a cancelled or failed run leaves the scene as it was. Re-thresholding (the λ
slider) is an in-process, torch-free library call on the cached maps. Packages: ``dependencies.py``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import slicer
import vtk
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

from .process import LIBRARY_PARENT, DetectionProcess, cudaAvailable, libraryEnvironment, pythonExecutable

from SACDiffLib.errors import SACDiffError  # noqa: E402  (torch-free; found through LIBRARY_PARENT by .process)


def _paper_detection() -> dict:
    from SACDiffLib.config import preset  # torch-free

    d = preset("paper").detect
    return {"ensemble": d.ensemble, "steps": d.steps, "samplingSteps": d.sampling_steps}


# Detection settings offered in the panel, from the library (one source of presets): "model" keeps the checkpoint's
# own settings (0 / −1 = "the model's"; the shipped model's are its fast CPU settings), "paper" is the paper's
# T_s 550, K 7, every step (GPU); "solid lesions" is the model's own chain plus the library's ``solid-lesions``
# profile (``config.DETECT_PROFILES``: a second, deep chain for nodules and masses, its own λ and α region).
DETECTION_PRESETS = {"model": {"ensemble": 0, "steps": 0, "samplingSteps": -1}, "paper": _paper_detection(),
                     "solid lesions": {"ensemble": 0, "steps": 0, "samplingSteps": -1}}
PRESET_PROFILES = {"solid lesions": "solid-lesions"}  # the presets that ask ``sacdiff detect --profile``


class PresetTracker:
    """Decides when picking a preset should overwrite K / T_s / reverse steps: only when the preset really changes
    (``connectGui`` refills the combo box on every module enter, which re-emits the current choice)."""

    def __init__(self, current: Optional[str] = None):
        self.current = current

    def change(self, name: str) -> Optional[dict]:
        if name not in DETECTION_PRESETS or name == self.current:
            return None
        first = self.current is None
        self.current = name
        return None if first else dict(DETECTION_PRESETS[name])

# DICOM-coded terminology of the anomaly segment (Slicer terminology entry string): category "Morphologically
# Altered Structure" (SCT 49755003), type "Mass" (SCT 4147007: the most generic type that Slicer's DICOM master
# list offers in that category; "Lesion" is not in it), anatomic region "Lung" (SCT 39607008). An annotator
# re-codes each finding (Nodule, Inflammation, ...) when editing the exported segmentation.
ANOMALY_TERMINOLOGY = (
    "Segmentation category and type - DICOM master list~SCT^49755003^Morphologically Altered Structure"
    "~SCT^4147007^Mass~^^~Anatomic codes - DICOM master list~SCT^39607008^Lung~^^"
)
ANOMALY_COLOR = (0.95, 0.75, 0.1)  # amber: visible over lung parenchyma and over the red/blue lung segments

OUTPUT_NAMES = {
    "segmentation": "Anomaly",
    "anomaly_map": "Anomaly map",
    "uncertainty": "Uncertainty",
    "pseudo_healthy": "Pseudo-healthy",
}
COLOR_NODES = {  # Slicer's built-in colour tables (Slicer loads them from its ColorFiles folder at start-up)
    "anomaly_map": "vtkMRMLColorTableNodeFileInferno.txt",
    "uncertainty": "vtkMRMLColorTableNodeFileViridis.txt",
    "pseudo_healthy": "vtkMRMLColorTableNodeGrey",
}
# The same maps as 9 evenly spaced anchors (matplotlib's inferno / viridis), for a scene that lacks Slicer's files
# (a custom application, slicer-core): the project's own table, named "SACDiff <name>", is made from them.
OWN_COLORS = {
    "anomaly_map": ("Inferno", ((0.001, 0.0, 0.014), (0.129, 0.047, 0.291), (0.342, 0.062, 0.429),
                                (0.541, 0.135, 0.415), (0.736, 0.216, 0.33), (0.894, 0.353, 0.194),
                                (0.978, 0.558, 0.035), (0.975, 0.798, 0.206), (0.988, 0.998, 0.645))),
    "uncertainty": ("Viridis", ((0.267, 0.005, 0.329), (0.279, 0.175, 0.483), (0.23, 0.322, 0.546),
                                (0.173, 0.449, 0.558), (0.128, 0.567, 0.551), (0.158, 0.684, 0.502),
                                (0.369, 0.789, 0.383), (0.678, 0.864, 0.19), (0.993, 0.906, 0.144))),
}


def colorNodeID(key: str) -> str:
    """The colour table for output ``key``: Slicer's own when the scene has it, else the project's (made once)."""
    builtin = COLOR_NODES[key]
    if slicer.mrmlScene.GetNodeByID(builtin) is not None or key not in OWN_COLORS:
        return builtin
    name, anchors = OWN_COLORS[key]
    existing = slicer.mrmlScene.GetFirstNodeByName(f"SACDiff {name}")
    if existing is not None:
        return existing.GetID()
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLColorTableNode", f"SACDiff {name}")
    node.SetTypeToUser()
    node.SetNumberOfColors(256)
    anchors = np.asarray(anchors)
    positions = np.linspace(0.0, 1.0, len(anchors))
    for i in range(256):
        rgb = [float(np.interp(i / 255.0, positions, anchors[:, c])) for c in range(3)]
        node.SetColor(i, f"{i}", *rgb, 1.0)
    return node.GetID()


class SACDiffInputError(SACDiffError):
    """A problem with what the user selected in the panel; the message says what to do. One family with the
    library's errors: the panel shows either as the one line it is."""


class _NoNewNodes:
    """Removes every node added to the scene inside the block (slicer.util's segment export leaves a labelmap
    display node behind), so that reading the inputs leaves the scene exactly as it was."""

    def __enter__(self):
        scene = slicer.mrmlScene
        self.before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
        return self

    def __exit__(self, *exc):
        scene = slicer.mrmlScene
        added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in added:
            if node is not None and node.GetID() not in self.before and scene.IsNodePresent(node):
                scene.RemoveNode(node)
        return False


class SACDiffLogic(ScriptedLoadableModuleLogic):
    """Scene ↔ SACDiffLib. Holds the last result so that λ can be changed without running the model."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.result = None  # SACDiffLib.result.DetectionResult of the loaded run
        self.runDir: Optional[Path] = None
        self.ctNode = None
        self.runCrf = True
        self.outputNodes: dict = {}

    cudaAvailable = staticmethod(cudaAvailable)

    # --- inputs -------------------------------------------------------------------------------------------------

    @staticmethod
    def checkCT(ctNode):
        if ctNode is None:
            raise SACDiffInputError("Select a CT volume first (Input CT).")
        if not ctNode.IsA("vtkMRMLScalarVolumeNode") or ctNode.IsA("vtkMRMLLabelMapVolumeNode"):
            raise SACDiffInputError(f"'{ctNode.GetName()}' is not a scalar CT volume; select the CT image.")
        image = ctNode.GetImageData()
        if image is None or min(image.GetDimensions()) < 1:
            raise SACDiffInputError(f"'{ctNode.GetName()}' holds no image data; load the CT again.")
        if image.GetDimensions()[2] < 2:
            raise SACDiffInputError(f"'{ctNode.GetName()}' is a single slice; SACDiff needs a 3D chest CT.")

    def lungArray(self, ctNode, lungNode) -> np.ndarray:
        """The lung mask as uint8 (k, j, i) on the CT's voxel grid (any non-zero label / any segment = lung)."""
        self.checkCT(ctNode)
        if lungNode is None:
            raise SACDiffInputError("Select a lung segmentation, or press 'Create lung mask' to make one.")
        if lungNode.IsA("vtkMRMLSegmentationNode"):
            segmentation = lungNode.GetSegmentation()
            if segmentation.GetNumberOfSegments() == 0:
                raise SACDiffInputError(f"Lung segmentation '{lungNode.GetName()}' has no segments.")
            lung = np.zeros(slicer.util.arrayFromVolume(ctNode).shape, np.uint8)
            with _NoNewNodes():
                for index in range(segmentation.GetNumberOfSegments()):
                    segmentId = segmentation.GetNthSegmentID(index)
                    # resampled onto the CT's geometry by Slicer (any segmentation geometry is accepted)
                    lung |= slicer.util.arrayFromSegmentBinaryLabelmap(lungNode, segmentId, ctNode) > 0
        elif lungNode.IsA("vtkMRMLLabelMapVolumeNode"):
            if not self._sameGeometry(ctNode, lungNode):
                raise SACDiffInputError(
                    f"Lung labelmap '{lungNode.GetName()}' does not share the CT's geometry (size, spacing, origin "
                    "or orientation differ); resample it to the CT (Resample Scalar/Vector/DWI Volume) or use a "
                    "segmentation node."
                )
            lung = (slicer.util.arrayFromVolume(lungNode) > 0).astype(np.uint8)
        else:
            raise SACDiffInputError(f"'{lungNode.GetName()}' is neither a segmentation nor a labelmap volume.")
        if not lung.any():
            raise SACDiffInputError(
                f"Lung mask '{lungNode.GetName()}' is empty on this CT; check that it belongs to the CT or press "
                "'Create lung mask'."
            )
        return lung

    @staticmethod
    def _sameGeometry(a, b) -> bool:
        ma, mb = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        a.GetIJKToRASMatrix(ma)
        b.GetIJKToRASMatrix(mb)
        same_matrix = all(abs(ma.GetElement(r, c) - mb.GetElement(r, c)) < 1e-4 for r in range(4) for c in range(4))
        return same_matrix and a.GetImageData().GetDimensions() == b.GetImageData().GetDimensions()

    @staticmethod
    def writeVolume(node, path: Path) -> Path:
        """Write a volume node with Slicer's own writer (geometry exactly as Slicer holds it). The storage node
        is not added to the scene, so the scene is unchanged."""
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(path))
        storage.SetUseCompression(0)
        if not storage.WriteData(node):
            raise RuntimeError(f"could not write '{node.GetName()}' to {path}")
        return path

    def writeInputs(self, ctNode, lungNode, folder: Path) -> tuple[Path, Path]:
        """CT and lung mask as NRRD files on the CT's grid, for the detection process."""
        import SimpleITK as sitk

        lung = self.lungArray(ctNode, lungNode)
        folder.mkdir(parents=True, exist_ok=True)
        ctPath = self.writeVolume(ctNode, folder / "ct.nrrd")
        reference = sitk.ReadImage(str(ctPath))
        lungImage = sitk.GetImageFromArray(lung)
        lungImage.CopyInformation(reference)
        lungPath = folder / "lung.nrrd"
        sitk.WriteImage(lungImage, str(lungPath))
        return ctPath, lungPath

    # --- detection ----------------------------------------------------------------------------------------------

    @staticmethod
    def detectionCommand(ctPath, lungPath, runDir, modelPath: str = "", device: str = "auto", ensemble: int = 0,
                         steps: int = 0, samplingSteps: int = -1, seed: int = 0, crf: bool = True,
                         lam: Optional[float] = None, profile: str = "") -> list[str]:
        """The ``sacdiff detect`` command line; 0 / −1 / "" / None keep the model's own setting. The panel's
        settings are named by their DetectConfig field; ``detect_arguments`` turns them into the command's flags.
        ``profile``: a ``config.DETECT_PROFILES`` name, under the panel's own settings."""
        from SACDiffLib.config import detect_arguments

        command = [pythonExecutable(), "-m", "SACDiffLib", "detect", str(ctPath), "--lung", str(lungPath),
                   "--out", str(runDir), "--progress", "lines", "--device", device]
        if profile:
            command += ["--profile", profile]
        command += detect_arguments({"seed": int(seed), "crf": bool(crf)})
        if lam is not None:
            command += detect_arguments({"lam": float(lam)})
        if modelPath:
            command += ["--model", str(modelPath)]
        fromModel = {"ensemble": int(ensemble), "steps": int(steps)}  # 0 = the model's own
        command += detect_arguments({k: v for k, v in fromModel.items() if v > 0})
        if steps > 0:  # a T_s of the user's (the paper's 550) runs Alg. 2's one chain, not the model's deep chain
            command += detect_arguments({"deep_steps": 0})
        if samplingSteps >= 0:  # −1 = the model's own (0 means "every step")
            command += detect_arguments({"sampling_steps": int(samplingSteps)})
        return command

    def startDetection(self, ctNode, lungNode, **options) -> DetectionProcess:
        """Write the inputs to a work folder and start ``sacdiff detect`` on them. Returns at once."""
        self.checkCT(ctNode)
        workDir = Path(tempfile.mkdtemp(prefix="SACDiff-", dir=self._temporaryFolder()))
        try:
            ctPath, lungPath = self.writeInputs(ctNode, lungNode, workDir)
        except Exception:
            shutil.rmtree(workDir, ignore_errors=True)
            raise
        runDir = workDir / "run"
        env = libraryEnvironment()
        env["PYTHONUNBUFFERED"] = "1"
        command = self.detectionCommand(ctPath, lungPath, runDir, **options)
        return DetectionProcess(command, runDir, workDir, env)

    @staticmethod
    def _runLibrary(command: list, timeout: float):
        """A short ``python -m SACDiffLib …`` child run to its end; its stdout, or SACDiffInputError with the
        library's one-line error (else its last line of output)."""
        import subprocess

        from SACDiffLib.protocol import is_error_line

        done = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", errors="replace",
                              timeout=timeout, env=libraryEnvironment(), cwd=str(LIBRARY_PARENT))
        if done.returncode != 0:
            lines = [ln for ln in (done.stderr or "").splitlines() if ln.strip()]
            errors = [ln for ln in lines if is_error_line(ln)]
            raise SACDiffInputError((errors or lines or [f"exit status {done.returncode}"])[-1])
        return done.stdout

    @staticmethod
    def _temporaryFolder() -> Optional[str]:
        app = getattr(slicer, "app", None)
        return app.temporaryPath if app is not None and hasattr(app, "temporaryPath") else None

    # --- results into the scene ---------------------------------------------------------------------------------

    def loadResults(self, ctNode, runDir) -> dict:
        """Read a finished run folder and show it: segmentation 'Anomaly' and volumes 'Anomaly map',
        'Uncertainty', 'Pseudo-healthy' with the CT's exact geometry, under the CT's study. Re-running replaces
        the arrays of the nodes of the previous run."""
        import SimpleITK as sitk
        from SACDiffLib.outputs import FILES, load_run

        result = load_run(runDir)
        if result.error.shape != slicer.util.arrayFromVolume(ctNode).shape:
            raise SACDiffInputError("the run's maps do not have the CT's size; run detection again on this CT")
        self.result, self.runDir, self.ctNode = result, Path(runDir), ctNode
        self.runCrf = result.detect.crf
        ijkToRAS = vtk.vtkMatrix4x4()
        ctNode.GetIJKToRASMatrix(ijkToRAS)
        arrays = {
            "anomaly_map": result.error,
            "uncertainty": result.uncertainty_hu,
            "pseudo_healthy": sitk.GetArrayFromImage(sitk.ReadImage(str(Path(runDir) / FILES["pseudo_healthy"]))),
        }
        for key, array in arrays.items():
            node = self._reuse(key, "vtkMRMLScalarVolumeNode")
            if node is None:
                node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", OUTPUT_NAMES[key])
            node.SetIJKToRASMatrix(ijkToRAS)
            slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array, dtype=np.float32))
            node.CreateDefaultDisplayNodes()
            display = node.GetDisplayNode()
            if display is not None:
                display.SetAndObserveColorNodeID(colorNodeID(key))
                display.AutoWindowLevelOn()
            self.outputNodes[key] = node

        segmentation = self._reuse("segmentation", "vtkMRMLSegmentationNode")
        if segmentation is None:
            segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", OUTPUT_NAMES["segmentation"])
            segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(ctNode)  # DICOM SEG export needs it
        segmentation.SetNodeReferenceID(segmentation.GetReferenceImageGeometryReferenceRole(), ctNode.GetID())
        self.outputNodes["segmentation"] = segmentation
        self._updateSegment()
        self._placeUnderStudy(ctNode, self.outputNodes.values())
        return dict(self.outputNodes)

    def _reuse(self, key: str, className: str):
        node = self.outputNodes.get(key)
        if node is not None and node.GetScene() is slicer.mrmlScene and node.IsA(className):
            return node
        return None

    def anomalySegmentId(self) -> str:
        segmentation = self.outputNodes["segmentation"].GetSegmentation()
        segmentId = segmentation.GetSegmentIdBySegmentName("Anomaly")
        if not segmentId:
            segmentId = segmentation.AddEmptySegment("anomaly", "Anomaly", ANOMALY_COLOR)
            segment = segmentation.GetSegment(segmentId)
            segment.SetTag(segment.GetTerminologyEntryTagName(), ANOMALY_TERMINOLOGY)
        return segmentId

    def _updateSegment(self):
        segmentationNode = self.outputNodes["segmentation"]
        slicer.util.updateSegmentBinaryLabelmapFromArray(
            self.result.mask.astype(np.uint8), segmentationNode, self.anomalySegmentId(), self.ctNode
        )

    @staticmethod
    def _placeUnderStudy(ctNode, nodes):
        shNode = slicer.mrmlScene.GetSubjectHierarchyNode()
        if shNode is None:
            return
        ctItem = shNode.GetItemByDataNode(ctNode)
        parent = shNode.GetItemParent(ctItem) if ctItem else shNode.GetSceneItemID()
        for node in nodes:
            item = shNode.GetItemByDataNode(node)
            if item:
                shNode.SetItemParent(item, parent)
            else:  # Slicer's subject hierarchy plugins add items for new nodes; without them, add it here
                shNode.CreateItem(parent, node)

    # --- λ and quantification -----------------------------------------------------------------------------------

    def setLambda(self, lam: float, crf: Optional[bool] = None) -> dict:
        """Re-binarise the cached error map with λ (no diffusion) and update the 'Anomaly' segment. ``crf`` None
        keeps the run's CRF setting; False is the fast path while the slider moves."""
        from SACDiffLib.postprocess import rethreshold

        if self.result is None:
            raise SACDiffInputError("Run detection first; λ re-thresholds the last result.")
        rethreshold(self.result, lam, self.runCrf if crf is None else crf)
        self._updateSegment()
        return self.summary()

    def summary(self) -> dict:
        q = self.result.quantification
        return {
            "alpha": self.result.threshold.alpha,
            "lambda": self.result.threshold.lam,
            "anomaly_ml": q["anomaly_ml"],
            "anomaly_percent": q["anomaly_percent_of_lung"],
            "right_percent": q["right_anomaly_percent"],
            "left_percent": q["left_anomaly_percent"],
            "right_ml": q["right_anomaly_ml"],
            "left_ml": q["left_anomaly_ml"],
        }

    # --- lung mask fallback -------------------------------------------------------------------------------------

    @staticmethod
    def lungMaskCommand(ctPath, outPath, lungModel: str = "") -> list[str]:
        """``sacdiff lungmask --method learned``: the lung network runs in a child process (torch never enters
        Slicer's process), as detection does."""
        command = [pythonExecutable(), "-m", "SACDiffLib", "lungmask", str(ctPath), "--out", str(outPath),
                   "--method", "learned"]
        return command + (["--lung-model", str(lungModel)] if lungModel else [])

    _modelInfoCache: dict = {}  # (path, size, mtime) → info: one child process per model file

    @classmethod
    def modelInfo(cls, modelPath: str = "") -> dict:
        """The model's detection defaults and where its λ came from (``sacdiff info``, in a child process: no torch
        in Slicer's). Raises SACDiffInputError with the library's message for a file that is not a model."""
        import json

        key = modelPath
        if modelPath and Path(modelPath).is_file():
            st = Path(modelPath).stat()
            key = (modelPath, st.st_size, st.st_mtime_ns)
        if key not in cls._modelInfoCache:
            command = [pythonExecutable(), "-m", "SACDiffLib", "info"] + (["--model", modelPath] if modelPath else [])
            cls._modelInfoCache[key] = json.loads(cls._runLibrary(command, timeout=300).strip().splitlines()[-1])
        return dict(cls._modelInfoCache[key])

    def createLungSegmentation(self, ctNode, learned: bool = False, lungModel: str = ""):
        """A lung segmentation with 'Right lung' and 'Left lung': the library's classical threshold mask (in
        process, torch-free), or with ``learned`` SACDiff's pathology-inclusive lung network (child process)."""
        from SACDiffLib import io
        from SACDiffLib.lung import segment_lungs

        self.checkCT(ctNode)
        with tempfile.TemporaryDirectory(prefix="SACDiff-lung-", dir=self._temporaryFolder()) as folder:
            ctPath = self.writeVolume(ctNode, Path(folder) / "ct.nrrd")
            ct = io.read_ct(ctPath)
            if learned:
                outPath = Path(folder) / "lung.nrrd"
                self._runLibrary(self.lungMaskCommand(ctPath, outPath, lungModel), timeout=1800)
                labels = io.read_mask(outPath, ct)
            else:
                labels = segment_lungs(io.ct_array(ct), ct)
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{ctNode.GetName()} lungs (SACDiff)")
        node.CreateDefaultDisplayNodes()
        node.SetReferenceImageGeometryParameterFromVolumeNode(ctNode)
        for label, name, color in ((1, "Right lung", (0.5, 0.68, 0.5)), (2, "Left lung", (0.37, 0.55, 0.37))):
            segmentId = node.GetSegmentation().AddEmptySegment(name.lower().replace(" ", "_"), name, color)
            slicer.util.updateSegmentBinaryLabelmapFromArray((labels == label).astype(np.uint8), node, segmentId,
                                                             ctNode)
        self._placeUnderStudy(ctNode, [node])
        return node

    # --- export -------------------------------------------------------------------------------------------------

    def exportResults(self, folder) -> list[Path]:
        """Write anomaly.seg.nrrd (Slicer segmentation, for annotation tools), the NIfTI masks and maps and
        report.json of the current λ into ``folder``, assembled under a temporary name and renamed when complete."""
        from SACDiffLib.atomic import Output
        from SACDiffLib.outputs import write_threshold_update

        if self.result is None or self.runDir is None:
            raise SACDiffInputError("Nothing to export yet; run detection first.")
        folder = Path(folder)
        output = Output(folder, "results", overwrite=True)  # only an earlier SACDiff export is replaced
        write_threshold_update(self.result, self.runDir)  # mask / report / overview of the current λ
        with output as tmp:
            for item in Path(self.runDir).iterdir():
                if item.is_file():
                    shutil.copy2(item, tmp / item.name)
            storage = slicer.vtkMRMLSegmentationStorageNode()
            storage.SetFileName(str(tmp / "anomaly.seg.nrrd"))
            if not storage.WriteData(self.outputNodes["segmentation"]):
                raise RuntimeError("writing anomaly.seg.nrrd failed")
        return sorted(folder.iterdir())
