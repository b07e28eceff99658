"""Reading CT and masks (SimpleITK), checks, windowing, lung slices, and the model's in-plane grid.

Arrays are numpy in SimpleITK's (z, y, x) order. Outputs are written with the CT's exact geometry (size, spacing,
origin, direction copied from the CT image).
"""

from __future__ import annotations

import os
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from .config import PreprocessConfig
from .errors import SACDiffError

if TYPE_CHECKING:  # torch is imported where tensors are made (the model grid), not to read or write images
    import torch

READABLE = ".nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd or a DICOM series folder"


def check_complete(path: Path) -> None:
    """Refuse a file that ends early. SimpleITK reads a truncated .nii.gz without complaint and fills the missing
    voxels with 0 (0 HU: soft tissue), which turns a broken download into a 'lesion'. A gzip stream must decompress
    to its end, and a NIfTI's data must fill what its header declares (vox_offset + voxels × bytes per voxel)."""
    import gzip
    import struct
    import zlib

    name = path.name.lower()
    if name.endswith(".gz"):
        try:
            with gzip.open(path, "rb") as f:
                head = f.read(352)
                size = len(head)
                while chunk := f.read(1 << 22):
                    size += len(chunk)
        except (EOFError, OSError, zlib.error) as exc:
            raise SACDiffError(f"{path} is damaged or ends early ({type(exc).__name__}: {exc}); download or copy "
                               "it again") from None
    elif name.endswith(".nii"):
        with open(path, "rb") as f:
            head = f.read(352)
        size = path.stat().st_size
    else:
        return
    if not (name.endswith(".nii") or name.endswith(".nii.gz")) or len(head) < 348:
        return
    for endian in ("<", ">"):
        if struct.unpack(endian + "i", head[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", head[40:56])
            bitpix = struct.unpack(endian + "h", head[72:74])[0]
            vox_offset = struct.unpack(endian + "f", head[108:112])[0]
            voxels = int(np.prod([max(1, d) for d in dims[1: 1 + max(0, min(dims[0], 7))]], dtype=np.int64))
            expected = int(vox_offset) + voxels * bitpix // 8
            if size < expected:
                raise SACDiffError(f"{path} ends early: its header declares {expected} bytes of image, the file holds "
                                   f"{size}; download or copy it again")
            return


def read_image(path) -> sitk.Image:
    """A NIfTI / NRRD / MHA file or a folder holding one DICOM series; refuses a file that ends early."""
    path = Path(path)
    if not path.exists():
        raise SACDiffError(f"{path} does not exist; give a {READABLE}")
    if path.is_file():
        check_complete(path)
    try:
        if path.is_dir():
            if not any(p.is_file() for p in path.iterdir()):
                raise SACDiffError(f"folder {path} is empty; give a {READABLE}")
            reader = sitk.ImageSeriesReader()
            warnings = sitk.ProcessObject.GetGlobalWarningDisplay()
            sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK warns about every non-DICOM file it skips
            try:
                series = reader.GetGDCMSeriesIDs(str(path))
            finally:
                sitk.ProcessObject.SetGlobalWarningDisplay(warnings)
            if not series:
                raise SACDiffError(f"folder {path} holds no DICOM series; give a {READABLE}")
            if len(series) > 1:
                raise SACDiffError(
                    f"folder {path} holds {len(series)} DICOM series ({', '.join(series[:3])}...); "
                    "give a folder with exactly one series"
                )
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), series[0]))
            return reader.Execute()
        return sitk.ReadImage(str(path))
    except SACDiffError:
        raise
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1][:200]
        raise SACDiffError(f"cannot read {path} ({reason}); give a {READABLE}") from None


def read_ct(path) -> sitk.Image:
    """A 3D CT in Hounsfield units; refuses 2D images, NaNs and intensities that are not HU."""
    image = read_image(path)
    check_ct(image, str(path))
    return image


def check_ct(image: sitk.Image, name: str = "CT") -> None:
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise SACDiffError(
            f"{name} is a {image.GetDimension()}D image with {image.GetNumberOfComponentsPerPixel()} component(s); "
            "SACDiff needs a 3D single-channel CT volume (for one slice, stack it into a volume first)"
        )
    array = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise SACDiffError(f"{name} has {bad} NaN/infinite voxels; fix or replace them (e.g. with −1000 HU) first")
    lo, hi = float(array.min()), float(array.max())
    if image.GetPixelID() == sitk.sitkUInt8 or (lo >= 0 and hi <= 255):
        raise SACDiffError(
            f"{name} has intensities {lo:g}..{hi:g}, like an 8-bit picture, not Hounsfield units; "
            "give the CT in HU (DICOM rescale applied, air ≈ −1000 HU)"
        )
    if lo > -500:
        raise SACDiffError(
            f"{name} has no voxel below −500 HU (minimum {lo:g}), so it holds no air and is not a chest CT in "
            "Hounsfield units; apply the rescale slope/intercept or give a chest CT"
        )


def geometry_differences(a: sitk.Image, b: sitk.Image, tol: float = 1e-3) -> list[str]:
    """How b's geometry differs from a's (empty when they match)."""
    diffs = []
    if a.GetSize() != b.GetSize():
        diffs.append(f"size {b.GetSize()} vs {a.GetSize()}")
    for what, getter in (("spacing", "GetSpacing"), ("origin", "GetOrigin"), ("direction", "GetDirection")):
        va, vb = np.array(getattr(a, getter)()), np.array(getattr(b, getter)())
        if va.shape != vb.shape or not np.allclose(va, vb, atol=tol, rtol=0):
            fmt = lambda v: "(" + ", ".join(f"{x:g}" for x in np.round(v, 4)) + ")"  # noqa: E731
            diffs.append(f"{what} {fmt(vb)} vs {fmt(va)}")
    return diffs


def read_mask(path, reference: sitk.Image, what: str = "lung mask") -> np.ndarray:
    """A label image on exactly the reference CT's grid, as a uint8 (z, y, x) array."""
    image = read_image(path)
    return mask_array(image, reference, what, str(path))


def mask_array(image: sitk.Image, reference: sitk.Image, what: str = "lung mask", name: str = "") -> np.ndarray:
    if image.GetDimension() != 3:
        raise SACDiffError(f"{what} {name} is {image.GetDimension()}D; it must be a 3D mask on the CT's grid")
    diffs = geometry_differences(reference, image)
    if diffs:
        raise SACDiffError(
            f"{what} {name} does not match the CT's geometry ({'; '.join(diffs)}, mask vs CT); "
            "resample the mask onto the CT grid (nearest neighbour) or give the mask made for this CT"
        )
    array = sitk.GetArrayFromImage(image)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise SACDiffError(f"{what} {name} has {image.GetNumberOfComponentsPerPixel()} components per voxel; give a "
                           "single-channel label image")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise SACDiffError(f"{what} {name} has NaN/infinite voxels; give a label image")
        if not np.array_equal(array, np.rint(array)):
            raise SACDiffError(f"{what} {name} holds fractional values (e.g. {array[array != np.rint(array)][0]:g}): "
                               "a probability map, not a label image; threshold it into 0/1 labels first")
    lo, hi = float(array.min()), float(array.max())
    if lo < 0 or hi > 255:
        raise SACDiffError(f"{what} {name} holds values {lo:g}..{hi:g}, like an intensity image (a CT?), not labels "
                           "0..255; give the label image")
    array = array.astype(np.uint8)
    if not array.any():
        raise SACDiffError(f"{what} {name} is empty; give a mask with the lungs labelled (or omit it to use "
                           "`sacdiff lungmask`'s automatic lung mask)")
    return array


def ct_array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image).astype(np.float32)


def window(hu, cfg: PreprocessConfig):
    """Chest window [hu_min, hu_max] → [−1, 1] (clipped)."""
    scale = 2.0 / (cfg.hu_max - cfg.hu_min)
    x = (hu - cfg.hu_min) * scale - 1.0
    return x.clip(-1.0, 1.0) if isinstance(x, np.ndarray) else x.clamp(-1.0, 1.0)


def unwindow(x, cfg: PreprocessConfig):
    """[−1, 1] → HU (inverse of :func:`window` inside the window)."""
    return (x + 1.0) * (cfg.hu_max - cfg.hu_min) / 2.0 + cfg.hu_min


def hu_per_unit(cfg: PreprocessConfig) -> float:
    """HU per unit of the windowed [−1, 1] image (for converting stds)."""
    return (cfg.hu_max - cfg.hu_min) / 2.0


def lung_slices(lung: np.ndarray, min_fraction: float) -> np.ndarray:
    """Indices z of the slices whose lung area is at least ``min_fraction`` of the slice (Section 3.1)."""
    fraction = (lung > 0).reshape(lung.shape[0], -1).mean(axis=1)
    return np.flatnonzero(fraction >= min_fraction)


def to_model_grid(slices: "torch.Tensor", size: int, pad_value: float, mask: bool = False) -> "torch.Tensor":
    """(S, Y, X) → (S, 1, size, size): pad to a centred square (keeps the aspect ratio), then resize."""
    import torch.nn.functional as F  # torch only where the model grid is needed: reading results needs none

    s, h, w = slices.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    x = F.pad(slices.float().unsqueeze(1), (left, side - w - left, top, side - h - top), value=pad_value)
    if side != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=side > size)
    return (x > 0.5).float() if mask else x


def model_inputs(hu: np.ndarray, lung: np.ndarray, cfg: PreprocessConfig) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Slices (S, Y, X) in HU and their lung mask → the network's image x₀ and condition c, (S, 1, size, size)
    each: windowed to [−1, 1] (Section 3.1) and put on the model grid (air −1 / no lung 0 as padding). The one
    preparation of slices, for training and detection alike."""
    import torch

    x = to_model_grid(torch.from_numpy(window(hu, cfg)), cfg.image_size, pad_value=-1.0)
    c = to_model_grid(torch.from_numpy(lung > 0), cfg.image_size, 0.0, mask=True)
    return x, c


def from_model_grid(x: "torch.Tensor", shape: tuple[int, int]) -> "torch.Tensor":
    """Inverse of :func:`to_model_grid`: (S, 1, size, size) → (S, Y, X) on the CT's in-plane grid."""
    import torch.nn.functional as F

    h, w = shape
    side = max(h, w)
    if x.shape[-1] != side:
        x = F.interpolate(x.float(), size=(side, side), mode="bilinear", align_corners=False)
    top, left = (side - h) // 2, (side - w) // 2
    return x[:, 0, top : top + h, left : left + w]


def image_like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """``array`` with the reference's geometry, noted as SACDiff's own (so ``--overwrite`` may replace it)."""
    from .atomic import IMAGE_NOTE

    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    image.SetMetaData("ITK_FileNotes", IMAGE_NOTE)
    return image


def write_image(array: np.ndarray, reference: sitk.Image, path) -> Path:
    """Write ``array`` with the reference's geometry, via a temporary name renamed when complete."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-w{''.join(path.suffixes)}")  # the suffix picks the format
    try:
        sitk.WriteImage(image_like(array, reference), str(tmp), useCompression=True)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
