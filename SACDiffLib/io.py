"""Reading CT and masks (SimpleITK), checks, windowing, lung slices, and the model's in-plane grid.

Arrays are numpy in SimpleITK's (z, y, x) order. Outputs are written with the CT's exact geometry (size, spacing,
origin, direction copied from the CT image).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .config import PreprocessConfig
from .errors import SACDiffError

READABLE = ".nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd or a DICOM series folder"


def read_image(path) -> sitk.Image:
    """A NIfTI / NRRD / MHA file or a folder holding one DICOM series."""
    path = Path(path)
    if not path.exists():
        raise SACDiffError(f"{path} does not exist; give a {READABLE}")
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(path))
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
            diffs.append(f"{what} {tuple(np.round(vb, 4))} vs {tuple(np.round(va, 4))}")
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
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise SACDiffError(f"{what} {name} has NaN voxels; give a label image")
    array = np.rint(array).clip(0, 255).astype(np.uint8)
    if not array.any():
        raise SACDiffError(f"{what} {name} is empty; give a mask with the lungs labelled (or omit it to use "
                           "`sacdiff lungmask`'s automatic lung mask)")
    return array


def ct_array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image).astype(np.float32)


def window(hu: np.ndarray | torch.Tensor, cfg: PreprocessConfig):
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


def to_model_grid(slices: torch.Tensor, size: int, pad_value: float, mask: bool = False) -> torch.Tensor:
    """(S, Y, X) → (S, 1, size, size): pad to a centred square (keeps the aspect ratio), then resize."""
    s, h, w = slices.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    x = F.pad(slices.float().unsqueeze(1), (left, side - w - left, top, side - h - top), value=pad_value)
    if side != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=side > size)
    return (x > 0.5).float() if mask else x


def from_model_grid(x: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`to_model_grid`: (S, 1, size, size) → (S, Y, X) on the CT's in-plane grid."""
    h, w = shape
    side = max(h, w)
    if x.shape[-1] != side:
        x = F.interpolate(x.float(), size=(side, side), mode="bilinear", align_corners=False)
    top, left = (side - h) // 2, (side - w) // 2
    return x[:, 0, top : top + h, left : left + w]


def image_like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def write_image(array: np.ndarray, reference: sitk.Image, path) -> Path:
    """Write ``array`` with the reference's geometry, via a temporary name renamed when complete."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        sitk.WriteImage(image_like(array, reference), str(tmp), useCompression=True)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
