"""Reading, checks, windowing and the model grid, with real files through SimpleITK."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import make_chest, to_image
from SACDiffLib import io
from SACDiffLib.config import PreprocessConfig
from SACDiffLib.errors import SACDiffError


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_read_formats_keep_values_and_geometry(tmp_path, suffix):
    hu, _, _ = make_chest(32, 6)
    image = to_image(hu, dtype=np.int16)
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(image, str(path))
    back = io.read_ct(path)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), hu.astype(np.int16))
    assert not io.geometry_differences(image, back)


def test_read_dicom_series_folder(tmp_path):
    hu, _, _ = make_chest(32, 5)
    volume = to_image(hu, dtype=np.int16)
    folder = tmp_path / "dicom"
    folder.mkdir()
    series = "1.2.826.0.1.3680043.2.1125.1.1"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()  # keep our series UID instead of one per file
    for z in range(volume.GetDepth()):
        sl = volume[:, :, z]
        for tag, value in {
            "0008|0060": "CT", "0020|000e": series, "0020|000d": series + ".9", "0020|0013": str(z + 1),
            "0020|0032": "\\".join(map(str, volume.TransformIndexToPhysicalPoint((0, 0, z)))),
            "0020|0037": "1\\0\\0\\0\\1\\0", "0028|0030": "1.5\\1.5", "0018|0050": "2.5",
        }.items():
            sl.SetMetaData(tag, value)
        sl.SetMetaData("0008|0018", f"{series}.{z + 1}")
        writer.SetFileName(str(folder / f"{z:03d}.dcm"))
        writer.Execute(sl)
    back = io.read_ct(folder)
    assert back.GetSize() == volume.GetSize()
    np.testing.assert_allclose(back.GetSpacing(), volume.GetSpacing(), atol=1e-3)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), hu.astype(np.int16))


def test_geometry_differences_are_named(tmp_path):
    hu, labels, _ = make_chest(32, 6)
    ct = to_image(hu)
    mask = to_image(labels, spacing=(1.5, 1.5, 3.0), origin=(0.0, 0.0, 0.0))
    sitk.WriteImage(mask, str(tmp_path / "m.nii.gz"))
    with pytest.raises(SACDiffError) as e:
        io.read_mask(tmp_path / "m.nii.gz", ct)
    assert "spacing" in str(e.value) and "origin" in str(e.value) and "resample" in str(e.value)


def test_window_round_trip_and_range():
    cfg = PreprocessConfig()
    hu = np.array([-2000.0, -1350.0, -600.0, 150.0, 1000.0])
    x = io.window(hu, cfg)
    np.testing.assert_allclose(x, [-1, -1, 0, 1, 1])
    np.testing.assert_allclose(io.unwindow(x[1:4], cfg), hu[1:4])
    assert io.hu_per_unit(cfg) == 750.0


def test_lung_slices():
    lung = np.zeros((4, 10, 10), np.uint8)
    lung[1, :2, :2] = 1  # 4 % of the slice
    lung[2, 0, 0] = 1  # 1 %
    assert io.lung_slices(lung, 0.02).tolist() == [1]
    assert io.lung_slices(lung, 0.005).tolist() == [1, 2]


def test_model_grid_round_trip_nonsquare():
    s = torch.rand(3, 40, 60)
    grid = io.to_model_grid(s, 32, pad_value=-1.0)
    assert grid.shape == (3, 1, 32, 32)
    back = io.from_model_grid(io.to_model_grid(s, 60, -1.0), (40, 60))
    torch.testing.assert_close(back, s)  # same size: padding and cropping only
    assert float(grid[:, :, 0].mean()) == pytest.approx(-1.0)  # padded rows are air
