"""Slice views of a real detection as 3D Slicer draws them (README pictures and EXTENSION_SCREENSHOTURLS).

The module's real Logic runs a real detection (child process, shipped model) on a real CT, loads the results into a
real MRML scene (``slicer-core``), and Slicer's own slice logic and segmentations displayable manager draw axial,
coronal and sagittal views offscreen (``Testing/slicer_views.py``): CT + 'Anomaly' segment | CT + anomaly map |
CT + uncertainty | pseudo-healthy. Usage (repository root, inside .venv; ≈ 2 min on 2 CPU cores):

    python Resources/results/render_slicer_views.py ../shared/data/ct/ctmd_P001_ct.nii.gz \
        ../shared/data/ct/ctmd_P001_lung.nii.gz 36:68 Resources/Screenshots

(the third argument keeps slices z0:z1 of the CT, to keep the run short). A fifth argument, a finished run folder
of the same CT and slices (`sacdiff detect` / `evaluate`), is loaded by the Logic instead of detecting again.
"""

import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "Testing"), str(ROOT / "SACDiff"), str(ROOT)]

import slicer  # noqa: E402  (slicer-core)
import slicer_standins  # noqa: E402
from slicer_views import SliceView  # noqa: E402

PANELS = ("Anomaly segment", "Anomaly map", "Uncertainty", "Pseudo-healthy")


def ijk_to_ras(image: sitk.Image) -> np.ndarray:
    """ITK's LPS geometry as Slicer's IJK→RAS matrix."""
    direction = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    matrix = np.eye(4)
    matrix[:3, :3] = np.diag([-1, -1, 1]) @ direction
    matrix[:3, 3] = np.diag([-1, -1, 1]) @ np.array(image.GetOrigin())
    return matrix


def add_volume(image: sitk.Image, name: str, class_name="vtkMRMLScalarVolumeNode"):
    return slicer.util.addVolumeFromArray(sitk.GetArrayFromImage(image), ijk_to_ras(image), name, class_name)


def main(ct_path, lung_path, slices, out_dir, run_dir=None):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    z0, z1 = (int(v) for v in slices.split(":"))
    ct_image, lung_image = sitk.ReadImage(str(ct_path))[:, :, z0:z1], sitk.ReadImage(str(lung_path))[:, :, z0:z1]
    slicer_standins.new_scene()
    from SACDiffModuleLib.logic import SACDiffLogic

    logic = SACDiffLogic()
    ct = add_volume(sitk.Cast(ct_image, sitk.sitkInt16), "CT")
    lung = add_volume(sitk.Cast(lung_image, sitk.sitkUInt8), "lung", "vtkMRMLLabelMapVolumeNode")
    lung.CreateDefaultDisplayNodes()
    lung.GetDisplayNode().SetVisibility(False)
    t0 = time.time()
    if run_dir is None:
        process = logic.startDetection(ct, lung, device="cpu")
        while process.running:
            for event in process.poll():
                if event[0] == "progress":
                    print(f"\r{event[1]:5.1%} {event[2] if len(event) > 2 else ''}"[:100], end="", flush=True)
            time.sleep(0.5)
        if process.returncode != 0:
            raise SystemExit(process.errorMessage())
        run_dir = process.runDir
    nodes = logic.loadResults(ct, run_dir)
    print(f"\nready after {time.time() - t0:.0f} s; {logic.summary()}")
    mask = logic.result.mask > 0
    z = int(np.argmax(mask.sum(axis=(1, 2)))) if mask.any() else mask.shape[0] // 2
    ys, xs = np.nonzero(mask[z]) if mask[z].any() else (np.array([mask.shape[1] // 2]), np.array([mask.shape[2] // 2]))
    centre = ijk_to_ras(ct_image) @ np.array([float(np.median(xs)), float(np.median(ys)), z, 1.0])
    lung_voxels = logic.result.lung > 0
    for key, lower_percentile in (("anomaly_map", None), ("uncertainty", 95)):
        display = nodes[key].GetDisplayNode()
        values = slicer.util.arrayFromVolume(nodes[key])[lung_voxels]
        # the anomaly map from α (what is flagged) and the uncertainty from its 95th percentile in the lung, up to
        # the 99.5th; below the threshold the foreground is transparent and the CT shows through
        low = logic.result.threshold.alpha if lower_percentile is None else float(np.percentile(values, lower_percentile))
        high = max(float(np.percentile(values, 99.5)), low * 1.01)
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(low, high)
        display.SetLowerThreshold(low)
        display.SetUpperThreshold(float(values.max()) + 1.0)
        display.ApplyThresholdOn()
    ct_display, pseudo_display = ct.GetDisplayNode(), nodes["pseudo_healthy"].GetDisplayNode()
    pseudo_display.AutoWindowLevelOff()
    pseudo_display.SetWindowLevel(ct_display.GetWindow(), ct_display.GetLevel())  # the CT's own window
    segmentation_display = nodes["segmentation"].GetDisplayNode()
    rows = []
    for orientation in ("Axial", "Coronal", "Sagittal"):
        tiles = []
        for panel in PANELS:
            view = SliceView(orientation, (360, 360))
            background = nodes["pseudo_healthy"] if panel == "Pseudo-healthy" else ct
            foreground = {"Anomaly map": nodes["anomaly_map"], "Uncertainty": nodes["uncertainty"]}.get(panel)
            segmentation_display.SetVisibility(panel == "Anomaly segment")
            view.show(background, foreground, 0.7 if foreground is not None else 0.0)
            view.jump_to(centre[:3])
            tile = Image.fromarray(view.render()[::-1].astype(np.uint8))
            ImageDraw.Draw(tile).text((6, 4), f"{orientation}: {panel}", fill=(255, 255, 255))
            tiles.append(tile)
        row = Image.new("RGB", (360 * len(tiles), 360))
        for i, tile in enumerate(tiles):
            row.paste(tile, (360 * i, 0))
        row.save(out_dir / f"slicer-{orientation.lower()}.png")
        rows.append(row)
    sheet = Image.new("RGB", (rows[0].width, 360 * len(rows)))
    for i, row in enumerate(rows):
        sheet.paste(row, (0, 360 * i))
    sheet.save(out_dir / "slicer-views.png")
    print(f"wrote {out_dir}/slicer-views.png and one PNG per orientation")


if __name__ == "__main__":
    if len(sys.argv) not in (5, 6):
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
