"""Reading, checks, windowing and the model grid, with real files through SimpleITK."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import make_chest, to_image, write_dicom_series as _write_dicom_series
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


def test_dicom_series_with_a_missing_or_duplicated_slice_is_refused(tmp_path):
    hu, _, _ = make_chest(32, 6)
    folder = _write_dicom_series(to_image(hu, dtype=np.int16), tmp_path / "gap")
    (folder / "003.dcm").unlink()  # ITK alone would read 5 slices 3 mm apart, every slice after the gap misplaced
    with pytest.raises(SACDiffError, match="not evenly spaced"):
        io.read_ct(folder)
    folder = _write_dicom_series(to_image(hu, dtype=np.int16), tmp_path / "dup")
    data = (folder / "002.dcm").read_bytes()
    (folder / "002b.dcm").write_bytes(data.replace(b".1.1.3\x00", b".1.1.9\x00") if b".1.1.3\x00" in data else data)
    with pytest.raises(SACDiffError, match="two slices at one position|not evenly spaced"):
        io.read_ct(folder)


def test_read_dicom_series_folder(tmp_path):
    hu, _, _ = make_chest(32, 5)
    volume = to_image(hu, dtype=np.int16)
    back = io.read_ct(_write_dicom_series(volume, tmp_path / "dicom"))
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


def _float_nifti(tmp_path, name, values):
    image = sitk.GetImageFromArray(values.astype(np.float32))
    image.SetSpacing((1.5, 1.5, 2.0))
    path = tmp_path / name
    sitk.WriteImage(image, str(path))
    return path


@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.nii"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nifti_nan_and_infinity_are_refused_though_the_reader_would_hide_them(tmp_path, name, bad):
    hu, _, _ = make_chest(32, 4)
    values = hu.astype(np.float32)
    values[2, 10:14, 10:14] = bad
    path = _float_nifti(tmp_path, name, values)
    assert np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).all()  # what SimpleITK alone gives
    with pytest.raises(SACDiffError, match="16 NaN/infinite voxel values"):
        io.read_ct(path)
    with pytest.raises(SACDiffError, match="NaN/infinite"):  # a mask is checked alike
        io.read_mask(path, to_image(hu))


def test_nifti_with_undefined_voxel_size_is_refused(tmp_path):
    import struct

    hu, _, _ = make_chest(32, 4)
    path = tmp_path / "ct.nii"
    sitk.WriteImage(to_image(hu, dtype=np.int16), str(path))
    data = bytearray(path.read_bytes())
    data[80:84] = struct.pack("<f", 0.0)  # pixdim[1] (x) = 0
    path.write_bytes(bytes(data))
    with pytest.raises(SACDiffError, match="undefined voxel size"):
        io.read_ct(path)


def test_uncompressed_nifti_named_nii_gz_is_read(tmp_path):
    hu, _, _ = make_chest(32, 4)
    plain = tmp_path / "ct.nii"
    sitk.WriteImage(to_image(hu, dtype=np.int16), str(plain))
    renamed = tmp_path / "ct.nii.gz"
    renamed.write_bytes(plain.read_bytes())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(io.read_ct(renamed)), hu.astype(np.int16))


def test_a_truncated_mha_is_called_damaged_not_missing(tmp_path):
    hu, _, _ = make_chest(32, 4)
    path = tmp_path / "ct.mha"
    sitk.WriteImage(to_image(hu, dtype=np.int16), str(path), False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SACDiffError, match="damaged or ends early"):
        io.read_ct(path)


def test_reading_a_dicom_series_keeps_the_locale_python_writes_text_with(tmp_path):
    """GDCM sets the C locale to "C": Python then wrote summaries as ASCII and a λ raised UnicodeEncodeError."""
    import locale

    before = locale.getpreferredencoding(False)
    hu, _, _ = make_chest(32, 4)
    io.read_ct(_write_dicom_series(to_image(hu, dtype=np.int16), tmp_path / "dicom"))
    assert locale.getpreferredencoding(False) == before
