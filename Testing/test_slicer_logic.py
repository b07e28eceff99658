"""The SACDiff module's Logic against the REAL MRML scene of ``slicer-core`` (no Slicer application in CI).

Only ``Testing/slicer_standins.py`` stands in for Slicer: the application's scene set-up and the one-class
``ScriptedLoadableModuleLogic``. Volumes, segmentations, storage nodes, subject hierarchy and ``slicer.util`` are
Slicer's own code.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core (real MRML) is not installed; pip install -e .[test]")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package is not slicer-core", allow_module_level=True)

import vtk  # noqa: E402

from conftest import ROOT, make_chest  # noqa: E402

sys.path.insert(0, str(ROOT / "SACDiff"))
import slicer_standins  # noqa: E402

SPACING = (1.5, 1.5, 2.5)
# A CT as Slicer holds a DICOM/NIfTI series in LPS: the IJK→RAS matrix flips x and y.
IJK_TO_RAS = np.array([[-SPACING[0], 0, 0, 40.0], [0, -SPACING[1], 0, 55.0], [0, 0, SPACING[2], -120.0], [0, 0, 0, 1]])


@pytest.fixture()
def scene():
    return slicer_standins.new_scene()


@pytest.fixture()
def logic(scene, tmp_path, monkeypatch):
    from SACDiffModuleLib.logic import SACDiffLogic

    # Slicer gives the logic its own temporary folder (slicer.app.temporaryPath); here it is the test's, so that no
    # SACDiff-* work folder outlives the test.
    monkeypatch.setattr(SACDiffLogic, "_temporaryFolder", staticmethod(lambda: str(tmp_path)))
    return SACDiffLogic()


def _ct_and_lung(scene, seed=3, lesion=True, labelmap=False):
    hu, labels, lesion_mask = make_chest(64, 12, seed, lesion)
    ct = slicer.util.addVolumeFromArray(hu.astype(np.int16), IJK_TO_RAS, "chest CT")
    if labelmap:
        lung = slicer.util.addVolumeFromArray(labels, IJK_TO_RAS, "lung labelmap", "vtkMRMLLabelMapVolumeNode")
    else:
        lung = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "lungs")
        lung.SetReferenceImageGeometryParameterFromVolumeNode(ct)
        for label, name in ((1, "right"), (2, "left")):
            sid = lung.GetSegmentation().AddEmptySegment(name, name)
            slicer.util.updateSegmentBinaryLabelmapFromArray((labels == label).astype(np.uint8), lung, sid, ct)
    return ct, lung, hu, labels, lesion_mask


def _matrix(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def _run(logic, ct, lung, model, **options):
    process = logic.startDetection(ct, lung, modelPath=str(model), device="cpu", **options)
    fractions = []
    while process.running:
        fractions += [e.fraction for e in process.poll() if e.kind.value == "progress"]
        time.sleep(0.05)
    fractions += [e.fraction for e in process.poll() if e.kind.value == "progress"]
    assert process.returncode == 0, process.errorMessage()
    return process, fractions


def test_inputs_leave_the_scene_with_slicer_geometry(scene, logic, tmp_path):
    ct, lung, hu, labels, _ = _ct_and_lung(scene)
    nodes_before = scene.GetNumberOfNodes()
    ct_path, lung_path = logic.writeInputs(ct, lung, tmp_path)
    assert scene.GetNumberOfNodes() == nodes_before  # writing adds no storage node to the scene
    image = sitk.ReadImage(str(ct_path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), hu.astype(np.int16))
    # ITK's LPS geometry of Slicer's RAS matrix: origin and direction of x and y change sign.
    np.testing.assert_allclose(image.GetSpacing(), SPACING)
    np.testing.assert_allclose(image.GetOrigin(), (-40.0, -55.0, -120.0))
    np.testing.assert_allclose(np.array(image.GetDirection()).reshape(3, 3), np.eye(3))
    lung_image = sitk.ReadImage(str(lung_path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(lung_image), (labels > 0).astype(np.uint8))
    assert lung_image.GetOrigin() == image.GetOrigin()


def test_detection_creates_segmentation_and_volumes_with_the_ct_geometry(scene, logic, tiny_checkpoint):
    ct, lung, *_ = _ct_and_lung(scene)
    sh = scene.GetSubjectHierarchyNode()
    study = sh.CreateStudyItem(sh.GetSceneItemID(), "Study 1")
    if sh.GetItemByDataNode(ct):
        sh.SetItemParent(sh.GetItemByDataNode(ct), study)
    else:  # no subject hierarchy plugins without the application: file the CT as Slicer's DICOM loader would
        sh.CreateItem(study, ct)
    assert sh.GetItemParent(sh.GetItemByDataNode(ct)) == study
    process, fractions = _run(logic, ct, lung, tiny_checkpoint, seed=1, crf=False)
    assert fractions and fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    nodes = logic.loadResults(ct, process.runDir)

    from SACDiffLib.outputs import FILES

    run_arrays = {k: sitk.GetArrayFromImage(sitk.ReadImage(str(process.runDir / FILES[k])))
                  for k in ("anomaly_map", "uncertainty", "pseudo_healthy", "anomaly_mask")}
    for key, name in (("anomaly_map", "Anomaly map"), ("uncertainty", "Uncertainty"),
                      ("pseudo_healthy", "Pseudo-healthy")):
        node = nodes[key]
        assert node.GetName() == name and node.IsA("vtkMRMLScalarVolumeNode")
        np.testing.assert_allclose(_matrix(node), _matrix(ct))
        assert node.GetImageData().GetDimensions() == ct.GetImageData().GetDimensions()
        np.testing.assert_allclose(slicer.util.arrayFromVolume(node), run_arrays[key], rtol=1e-6)
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == study
    segmentation = nodes["segmentation"]
    assert segmentation.GetName() == "Anomaly" and sh.GetItemParent(sh.GetItemByDataNode(segmentation)) == study
    assert segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole()) is ct
    segment_id = logic.anomalySegmentId()
    segment = segmentation.GetSegmentation().GetSegment(segment_id)
    entry = vtk.reference("")
    assert segment.GetTag(segment.GetTerminologyEntryTagName(), entry)
    assert "SCT^4147007^Mass" in str(entry)
    mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, ct)
    np.testing.assert_array_equal(mask > 0, run_arrays["anomaly_mask"] > 0)
    assert logic.summary()["anomaly_ml"] == pytest.approx(mask.sum() * np.prod(SPACING) / 1000, rel=1e-6)

    # A second run updates the same nodes instead of adding new ones.
    count = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    process2, _ = _run(logic, ct, lung, tiny_checkpoint, seed=2, crf=False)
    assert logic.loadResults(ct, process2.runDir)["anomaly_map"] is nodes["anomaly_map"]
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == count


def test_lambda_rethresholds_the_segment_and_export_reads_back_equal(scene, logic, tiny_checkpoint, tmp_path):
    ct, lung, *_ = _ct_and_lung(scene)
    process, _ = _run(logic, ct, lung, tiny_checkpoint, crf=False)
    logic.loadResults(ct, process.runDir)
    segmentation = logic.outputNodes["segmentation"]
    counts = {}
    for lam in (-1.0, 0.0, 3.0):
        summary = logic.setLambda(lam, crf=False)
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, logic.anomalySegmentId(), ct)
        counts[lam] = int(mask.sum())
        np.testing.assert_array_equal(mask > 0, logic.result.mask > 0)
        t = logic.result.threshold
        assert summary["alpha"] == pytest.approx(t.background_location + lam * t.background_scale)
    assert counts[-1.0] > counts[3.0]  # a lower λ flags more

    files = logic.exportResults(tmp_path / "export")
    names = {p.name for p in files}
    assert {"anomaly.seg.nrrd", "anomaly_mask.nii.gz", "anomaly_map.nii.gz", "uncertainty.nii.gz",
            "report.json"} <= names
    reread = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "reread")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(tmp_path / "export" / "anomaly.seg.nrrd"))
    assert storage.ReadData(reread)
    seg_id = reread.GetSegmentation().GetSegmentIdBySegmentName("Anomaly")
    back = slicer.util.arrayFromSegmentBinaryLabelmap(reread, seg_id, ct)
    np.testing.assert_array_equal(back > 0, logic.result.mask > 0)
    nifti = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "export" / "anomaly_mask.nii.gz")))
    np.testing.assert_array_equal(nifti > 0, logic.result.mask > 0)  # the exported mask is the λ = 3 one
    assert not list(tmp_path.glob(".export.tmp*"))


def test_cancel_stops_the_process_and_leaves_the_scene_as_it_was(scene, logic, tiny_checkpoint):
    ct, lung, *_ = _ct_and_lung(scene)
    nodes_before = scene.GetNumberOfNodes()
    process = logic.startDetection(ct, lung, modelPath=str(tiny_checkpoint), device="cpu", steps=90, ensemble=2,
                                   samplingSteps=0)
    deadline = time.time() + 120
    while process.fraction == 0 and process.running and time.time() < deadline:
        process.poll()
        time.sleep(0.02)
    assert process.running, process.errorMessage()
    process.cancel()
    assert not process.running and process.returncode != 0
    assert not process.workDir.exists() and not process.runDir.exists()
    assert scene.GetNumberOfNodes() == nodes_before and logic.result is None


def test_bad_inputs_give_clear_errors(scene, logic, tmp_path):
    from SACDiffModuleLib.logic import SACDiffInputError

    ct, lung, *_ = _ct_and_lung(scene)
    with pytest.raises(SACDiffInputError, match="Select a CT volume"):
        logic.startDetection(None, lung)
    with pytest.raises(SACDiffInputError, match="Select a lung segmentation"):
        logic.writeInputs(ct, None, tmp_path)
    empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty lungs")
    with pytest.raises(SACDiffInputError, match="has no segments"):
        logic.writeInputs(ct, empty, tmp_path)
    empty.GetSegmentation().AddEmptySegment("lung", "lung")
    with pytest.raises(SACDiffInputError, match="is empty on this CT"):
        logic.writeInputs(ct, empty, tmp_path)
    shifted = slicer.util.addVolumeFromArray(np.ones((12, 64, 64), np.uint8), np.diag([0.7, 0.7, 2.5, 1.0]),
                                             "other labelmap", "vtkMRMLLabelMapVolumeNode")
    with pytest.raises(SACDiffInputError, match="does not share the CT's geometry"):
        logic.writeInputs(ct, shifted, tmp_path)
    with pytest.raises(SACDiffInputError, match="not a scalar CT volume"):
        logic.checkCT(shifted)
    with pytest.raises(SACDiffInputError, match="Run detection first"):
        logic.setLambda(1.0)
    nodes_before = scene.GetNumberOfNodes()
    with pytest.raises(SACDiffInputError):
        logic.startDetection(ct, empty)
    assert scene.GetNumberOfNodes() == nodes_before


def test_labelmap_lung_on_the_ct_grid_is_accepted(scene, logic, tmp_path):
    ct, lung, _, labels, _ = _ct_and_lung(scene, labelmap=True)
    _, lung_path = logic.writeInputs(ct, lung, tmp_path)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(lung_path))), (labels > 0).astype(np.uint8))


def test_failed_detection_reports_the_library_error(scene, logic, tmp_path):
    ct, lung, *_ = _ct_and_lung(scene)
    bogus = tmp_path / "not-a-model.pt"
    bogus.write_bytes(b"nothing")
    process = logic.startDetection(ct, lung, modelPath=str(bogus), device="cpu")
    assert process.wait(120) == 2
    process.poll()
    assert "not a SACDiff checkpoint" in process.errorMessage() or "corrupt" in process.errorMessage()
    process.cleanup()


def test_create_lung_mask_makes_right_and_left_segments(scene, logic):
    ct, _, _, labels, _ = _ct_and_lung(scene, lesion=False)
    node = logic.createLungSegmentation(ct)
    segmentation = node.GetSegmentation()
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    assert names == ["Right lung", "Left lung"]
    right = slicer.util.arrayFromSegmentBinaryLabelmap(node, segmentation.GetSegmentIdBySegmentName("Right lung"), ct)
    left = slicer.util.arrayFromSegmentBinaryLabelmap(node, segmentation.GetSegmentIdBySegmentName("Left lung"), ct)
    truth = labels > 0
    for found in (right, left):
        assert found.sum() > 0.2 * truth.sum() / 2
    found = (right > 0) | (left > 0)
    dice = 2 * (found & truth).sum() / (found.sum() + truth.sum())
    assert dice > 0.8


def test_learned_lung_mask_runs_in_a_child_and_relays_its_one_line_error(scene, logic, tmp_path):
    from SACDiffModuleLib.logic import SACDiffInputError

    command = logic.lungMaskCommand(tmp_path / "ct.nrrd", tmp_path / "lung.nrrd", str(tmp_path / "m.pt"))
    assert command[1:5] == ["-m", "SACDiffLib", "lungmask", str(tmp_path / "ct.nrrd")]
    assert command[-4:] == ["--method", "learned", "--lung-model", str(tmp_path / "m.pt")]
    ct, _, _, _, _ = _ct_and_lung(scene, lesion=False)
    before = scene.GetNumberOfNodes()
    with pytest.raises(SACDiffInputError, match="m.pt does not exist"):
        logic.createLungSegmentation(ct, learned=True, lungModel=str(tmp_path / "m.pt"))
    assert scene.GetNumberOfNodes() == before  # nothing added on failure


def test_preset_tracker_overwrites_settings_only_on_a_real_change():
    from SACDiffModuleLib.logic import DETECTION_PRESETS, PresetTracker
    from SACDiffLib.config import preset

    assert DETECTION_PRESETS["paper"] == {"ensemble": preset("paper").detect.ensemble,
                                          "steps": preset("paper").detect.steps,
                                          "samplingSteps": preset("paper").detect.sampling_steps}
    tracker = PresetTracker()
    assert tracker.change("model") is None  # the first fill on connect: keep the parameter node's values
    assert tracker.change("model") is None  # connectGui refilling the box on module enter
    assert tracker.change("paper") == DETECTION_PRESETS["paper"]  # the user's choice
    assert tracker.change("paper") is None
    assert tracker.change("model") == DETECTION_PRESETS["model"]


def test_slice_view_shows_the_anomaly_segment_on_the_mask_and_only_inside_the_lung(scene, logic, tiny_checkpoint):
    """Slicer's own slice rendering (slice logic + segmentations displayable manager, offscreen) after loadResults:
    the amber 'Anomaly' colour covers the mask's voxels on screen and appears nowhere off the mask (so nowhere
    outside the lung); the CT underneath is drawn where its voxels are (lung dark, body bright)."""
    from scipy import ndimage
    from slicer_views import SliceView, sample

    ct, lung, hu, labels, _ = _ct_and_lung(scene)
    process, _ = _run(logic, ct, lung, tiny_checkpoint, seed=1, crf=False)
    logic.loadResults(ct, process.runDir)
    logic.setLambda(0.0, crf=False)
    mask = logic.result.mask > 0
    assert mask.any() and (mask <= (labels > 0)).all()
    z = int(np.argmax(mask.sum(axis=(1, 2))))
    lung.CreateDefaultDisplayNodes()
    lung.GetDisplayNode().SetVisibility(False)  # the input's segments get colours of their own (random without
    view = SliceView("Axial")                   # Slicer's colour files): only 'Anomaly' is on screen
    view.show(ct)
    ras = _matrix(ct) @ np.array([hu.shape[2] / 2, hu.shape[1] / 2, z, 1.0])
    view.jump_to(ras[:3])
    rgb = view.render().astype(int)
    kji = view.voxel_of_pixels(ct)
    on_volume = np.all((kji >= 0) & (kji < np.array(hu.shape)), axis=-1)
    assert on_volume.mean() > 0.5 and (kji[on_volume][:, 0] == z).all()  # the view shows slice z

    grey = rgb.mean(axis=-1)
    lung_px, body_px = sample(labels, kji) > 0, sample((hu > 0).astype(np.uint8), kji) > 0
    segment = (rgb[..., 0] - rgb[..., 2]) > 60  # amber over grey: R − B ≈ ½·(0.95 − 0.1)·255 at fill opacity ½
    mask_px = sample(mask.astype(np.uint8), kji) > 0
    assert grey[body_px & ~segment].mean() > grey[lung_px & ~segment].mean() + 80
    assert segment[mask_px].mean() > 0.9  # the fill covers the mask
    off_mask = segment & ~ndimage.binary_dilation(mask_px, iterations=3)  # (the outline may sit on the border)
    assert off_mask.sum() == 0
    assert not (segment & ~ndimage.binary_dilation(lung_px, iterations=3)).any()


def test_every_output_volume_has_a_colour_table_that_exists(scene, logic, tiny_checkpoint):
    """slicer-core ships no colour files: the maps fall back to the project's own Inferno / Viridis tables (their
    ends equal matplotlib's inferno / viridis ends); Grey is built in."""
    from SACDiffModuleLib.logic import OWN_COLORS

    ct, lung, *_ = _ct_and_lung(scene)
    process, _ = _run(logic, ct, lung, tiny_checkpoint, seed=1, crf=False)
    nodes = logic.loadResults(ct, process.runDir)
    for key in ("anomaly_map", "uncertainty", "pseudo_healthy"):
        color = nodes[key].GetDisplayNode().GetColorNode()
        assert color is not None and color.GetScene() is scene
        if key in OWN_COLORS:
            rgba = [0.0] * 4
            for index, anchor in ((0, OWN_COLORS[key][1][0]), (255, OWN_COLORS[key][1][-1])):
                color.GetColor(index, rgba)
                np.testing.assert_allclose(rgba[:3], anchor, atol=1 / 255)  # (the table stores 8-bit colours)
    again = logic.loadResults(ct, process.runDir)  # a second load reuses the tables, makes no new ones
    assert again["anomaly_map"].GetDisplayNode().GetColorNodeID() == nodes["anomaly_map"].GetDisplayNode().GetColorNodeID()
    assert scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode") >= 2


def test_without_a_lambda_the_run_uses_the_models_own(scene, logic, tiny_checkpoint):
    """The panel sends λ only when the user moved it: otherwise the checkpoint's λ (chosen by `sacdiff validate`)."""
    from SACDiffLib.checkpoint import load_checkpoint

    command = logic.detectionCommand("ct.nrrd", "lung.nrrd", "run")
    assert "--lambda" not in command
    given = logic.detectionCommand("ct.nrrd", "lung.nrrd", "run", lam=2.5)
    assert given[given.index("--lambda") + 1] == "2.5"
    ct, lung, *_ = _ct_and_lung(scene)
    process, _ = _run(logic, ct, lung, tiny_checkpoint, seed=1, crf=False)
    logic.loadResults(ct, process.runDir)
    assert logic.summary()["lambda"] == pytest.approx(load_checkpoint(tiny_checkpoint)[0].detect.lam)


def test_a_t_s_of_the_users_runs_one_chain_the_models_own_keeps_its_deep_chain(logic, tiny_checkpoint):
    """The paper preset's T_s 550 exceeds a model's deep chain (250 for the shipped one), which the library refuses:
    the panel then sends --deep-steps 0; with the model's own T_s it sends nothing and the model's chain runs."""
    from SACDiffLib.cli import build_parser

    own = logic.detectionCommand("ct.nrrd", "lung.nrrd", "run")
    assert "--deep-steps" not in own and "--profile" not in own
    solid = build_parser().parse_args(logic.detectionCommand("ct.nrrd", "lung.nrrd", "run", profile="solid-lesions")[3:])
    assert solid.profile == "solid-lesions" and solid.deep_steps is None  # the profile's own deep chain
    paper = logic.detectionCommand("ct.nrrd", "lung.nrrd", "run", ensemble=7, steps=550, samplingSteps=0)
    args = build_parser().parse_args(paper[3:])
    assert (args.steps, args.deep_steps, args.ensemble) == (550, 0, 7)


def test_the_detection_child_runs_python_m_sacdifflib(logic, tmp_path):
    """The entry point that sets the allocator up (test_allocator reads the setting back from that entry point)."""
    command = logic.detectionCommand(tmp_path / "ct.nrrd", tmp_path / "lung.nrrd", tmp_path / "run")
    assert command[1:4] == ["-m", "SACDiffLib", "detect"]
