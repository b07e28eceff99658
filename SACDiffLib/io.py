"""Reading CT and masks (SimpleITK), checks, windowing, lung slices, and the model's in-plane grid.

Arrays are numpy in SimpleITK's (z, y, x) order. Outputs are written with the CT's exact geometry (size, spacing,
origin, direction copied from the CT image).
"""

from __future__ import annotations

import os
from pathlib import Path

from typing import TYPE_CHECKING, Optional

import numpy as np
import SimpleITK as sitk

from .config import PreprocessConfig
from .errors import SACDiffError

if TYPE_CHECKING:  # torch is imported where tensors are made (the model grid), not to read or write images
    import torch

READABLE = ".nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd or a DICOM series folder"


NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}  # NIfTI datatype codes that can hold NaN / infinity


def _nifti_header(head: bytes) -> Optional[dict]:
    """The fields of a NIfTI-1 header that SACDiff checks, or None when ``head`` is not one."""
    import struct

    if len(head) < 348:
        return None
    for endian in ("<", ">"):
        if struct.unpack(endian + "i", head[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", head[40:56])
            return {"endian": endian, "dims": dims,
                    "datatype": struct.unpack(endian + "h", head[70:72])[0],
                    "bitpix": struct.unpack(endian + "h", head[72:74])[0],
                    "pixdim": struct.unpack(endian + "8f", head[76:108]),
                    "vox_offset": struct.unpack(endian + "f", head[108:112])[0],
                    "scl": struct.unpack(endian + "2f", head[112:120])}
    return None


def check_complete(path: Path) -> None:
    """Refuse a NIfTI file whose stored values a reader would change without a word. SimpleITK reads a truncated
    .nii.gz and fills the missing voxels with 0 (0 HU: soft tissue, a broken download becomes a 'lesion'); its NIfTI
    reader turns NaN and ±infinity into 0 (the same image as NRRD or MHA keeps them and is refused); and it reads an
    undefined voxel size (pixdim 0) as 1 mm. So: a gzip stream must decompress to its end, the data must fill what
    the header declares (vox_offset + voxels × bytes per voxel), a float image's stored values and its scaling
    (scl_slope, scl_inter) must be finite, and the voxel size must be positive. One pass over the file."""
    import gzip
    import zlib

    name = path.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        return
    with open(path, "rb") as f:
        compressed = f.read(2) == b"\x1f\x8b"  # by content: an uncompressed NIfTI named .nii.gz is a NIfTI too
    opener = gzip.open if compressed else open
    try:
        with opener(path, "rb") as f:
            head = f.read(352)
            header = _nifti_header(head)
            size, bad, offset, pending = len(head), 0, None, b""
            dtype = None
            if header is not None and header["datatype"] in NIFTI_FLOAT_TYPES:
                dtype = np.dtype(header["endian"] + NIFTI_FLOAT_TYPES[header["datatype"]])
                offset = int(header["vox_offset"])
                pending = head[offset:] if offset < len(head) else b""
                skip = max(0, offset - len(head))
            while chunk := f.read(1 << 22):
                size += len(chunk)
                if dtype is not None:
                    if skip:
                        cut = min(skip, len(chunk))
                        chunk, skip = chunk[cut:], skip - cut
                    data = pending + chunk
                    whole = len(data) - len(data) % dtype.itemsize
                    bad += int((~np.isfinite(np.frombuffer(data[:whole], dtype))).sum())
                    pending = data[whole:]
            if dtype is not None and pending and len(pending) >= dtype.itemsize:
                bad += int((~np.isfinite(np.frombuffer(pending, dtype))).sum())
    except (EOFError, OSError, zlib.error) as exc:
        raise SACDiffError(f"{path} is damaged or ends early ({type(exc).__name__}: {exc}); download or copy "
                           "it again") from None
    if header is None:
        return
    dims = header["dims"]
    ndim = max(0, min(dims[0], 7))
    voxels = int(np.prod([max(1, d) for d in dims[1: 1 + ndim]], dtype=np.int64))
    expected = int(header["vox_offset"]) + voxels * header["bitpix"] // 8
    if size < expected:
        raise SACDiffError(f"{path} ends early: its header declares {expected} bytes of image, the file holds "
                           f"{size}; download or copy it again")
    if bad:
        raise SACDiffError(f"{path} stores {bad} NaN/infinite voxel values (a NIfTI reader would silently turn them "
                           "into 0); fix or replace them (e.g. with −1000 HU) first")
    if not all(np.isfinite(header["scl"])):
        raise SACDiffError(f"{path} has a non-finite intensity scaling (scl_slope, scl_inter = {header['scl']}); "
                           "write the image again with a valid scaling")
    spacing = header["pixdim"][1: 1 + min(ndim, 3)]
    if any(not np.isfinite(v) or v <= 0 for v in spacing):
        raise SACDiffError(f"{path} has an undefined voxel size (pixdim {tuple(round(v, 4) for v in spacing)} mm; "
                           "a reader would guess 1 mm); set the image's spacing and save it again")


DICOM_POSITION_TOLERANCE = 0.05  # mm, and 1 % of the slice step: what a rounded ImagePositionPatient may differ by


def check_slice_positions(files: list, folder: Path) -> None:
    """Refuse a DICOM series whose slices are not evenly spaced along their normal: a missing slice (ITK then
    averages the spacing and misplaces every slice after the gap, with only a warning) or two slices at one
    position (two acquisitions mixed)."""
    reader = sitk.ImageFileReader()
    positions, normal = [], None
    for name in files:
        reader.SetFileName(str(name))
        reader.ReadImageInformation()
        keys = set(reader.GetMetaDataKeys())
        if not {"0020|0032", "0020|0037"} <= keys:
            if len(files) > 1:
                raise SACDiffError(f"DICOM file {name} has no slice position/orientation; SACDiff cannot place the "
                                   f"slices of {folder}: export the series again")
            return
        if normal is None:
            o = np.array([float(v) for v in reader.GetMetaData("0020|0037").split("\\")])
            normal = np.cross(o[:3], o[3:])
        positions.append(float(np.dot(normal, [float(v) for v in reader.GetMetaData("0020|0032").split("\\")])))
    if len(positions) < 2:
        return
    steps = np.diff(np.sort(positions))
    if steps.min() < DICOM_POSITION_TOLERANCE:
        raise SACDiffError(f"DICOM series in {folder} has two slices at one position "
                           f"({int((steps < DICOM_POSITION_TOLERANCE).sum())} duplicate(s)); it mixes two "
                           "acquisitions or holds a copy — keep one series per folder")
    step = float(np.median(steps))
    off = np.abs(steps - step) > DICOM_POSITION_TOLERANCE + 0.01 * step
    if off.any():
        i = int(np.argmax(off))
        raise SACDiffError(f"DICOM series in {folder} is not evenly spaced: slices {step:.3g} mm apart, but "
                           f"{steps[i]:.3g} mm between slices {i + 1} and {i + 2} (a missing slice?); give the "
                           "complete series or resample it to even spacing first")


def read_image(path) -> sitk.Image:
    """A NIfTI / NRRD / MHA file or a folder holding one DICOM series; refuses a file that ends early."""
    path = Path(path)
    if not path.exists():
        raise SACDiffError(f"{path} does not exist; give a {READABLE}")
    if path.is_file():
        check_complete(path)
    import locale

    saved_locale = locale.setlocale(locale.LC_CTYPE)
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
            files = reader.GetGDCMSeriesFileNames(str(path), series[0])
            check_slice_positions(list(files), path)
            reader.SetFileNames(files)
            return reader.Execute()
        return sitk.ReadImage(str(path))
    except SACDiffError:
        raise
    except RuntimeError as exc:
        raise _read_failure(path, exc) from None
    finally:
        _restore_locale(saved_locale)


def _restore_locale(saved: str) -> None:
    """GDCM (ITK's DICOM reader) sets the process's C locale to "C"; Python would then write text files as ASCII
    (a λ in a summary becomes a UnicodeEncodeError). Put back what was there before the read."""
    import locale

    try:
        if locale.setlocale(locale.LC_CTYPE) != saved:
            locale.setlocale(locale.LC_CTYPE, saved)
    except locale.Error:
        pass


def fingerprint(path) -> Optional[dict]:
    """Size and modification time of a file, or of every file of a DICOM folder: enough to tell that the CT a run
    names is still the one it was made from. None when the path does not exist."""
    path = Path(path)
    try:
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        stats = [p.stat() for p in files]
    except OSError:
        return None
    return {"files": len(stats), "bytes": sum(st.st_size for st in stats),
            "mtime_ns": max((st.st_mtime_ns for st in stats), default=0)}


def _read_failure(path: Path, exc: RuntimeError) -> SACDiffError:
    """One line for an ITK read error (its last line, at most 200 characters)."""
    reason = str(exc).strip().splitlines()[-1][:200]
    if "No such file" in reason and path.is_file():  # ITK's stale errno after a short read (a truncated .mha)
        return SACDiffError(f"{path} is damaged or ends early (its data could not be read whole); download or copy "
                            "it again")
    return SACDiffError(f"cannot read {path} ({reason}); give a {READABLE}")


def check_readable(path) -> None:
    """That an image file or DICOM folder can be read, without reading its voxels into memory: a NIfTI is checked
    whole (``check_complete``), any file's header must parse. For checking many inputs before long work."""
    path = Path(path)
    if not path.exists():
        raise SACDiffError(f"{path} does not exist; give a {READABLE}")
    if path.is_dir():
        read_image(path)
        return
    read_header(path)


def read_header(path: Path) -> sitk.ImageFileReader:
    """A file's header, after ``check_complete``: the reader holding size, spacing, origin and direction (no voxels
    read). One line (``SACDiffError``) for a file that ends early or cannot be parsed."""
    check_complete(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise _read_failure(path, exc) from None
    return reader


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


CROP_MARGIN = 8  # model-grid pixels of air kept around the body's bounding box


def crop_box(region: "torch.Tensor", multiple: int, margin: int = CROP_MARGIN) -> tuple[slice, slice]:
    """In-plane bounding box of ``region`` (S, 1, H, W) over all slices, widened by ``margin`` and to a multiple of
    ``multiple`` (the UNet's size multiple), kept inside the grid. The whole grid when the region is empty.

    Detection passes the body and the lung: the box's edges then lie in the air around the patient, where the
    UNet's zero padding meets what it met at the image border in training. A box cut through the body (the lung's
    box) makes the network paint an air band along the cut, ≈ 15 pixels deep, in the reconstruction."""
    h, w = region.shape[-2:]
    rows = (region.amax(dim=(0, 1, 3)) > 0).nonzero().flatten()
    cols = (region.amax(dim=(0, 1, 2)) > 0).nonzero().flatten()
    if rows.numel() == 0:
        return slice(0, h), slice(0, w)

    def span(lo: int, hi: int, size: int) -> slice:
        lo, hi = max(0, lo - margin), min(size, hi + 1 + margin)
        length = min(size, -(-(hi - lo) // multiple) * multiple)
        lo = max(0, min(lo - (length - (hi - lo)) // 2, size - length))
        return slice(lo, lo + length)

    return span(int(rows[0]), int(rows[-1]), h), span(int(cols[0]), int(cols[-1]), w)


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


def neighbour_offset(spacing_z: float, distance_mm: float) -> int:
    """Slices between a slice and its neighbour ``distance_mm`` away (at least one)."""
    return max(1, int(round(distance_mm / max(float(spacing_z), 1e-6))))


def context_indices(z: np.ndarray, offset: int, per_side: int, n_slices: int) -> list[np.ndarray]:
    """The slice indices of a stack of neighbouring slices: ``z`` itself, then z − d, z + d, z − 2d, z + 2d, …
    (``per_side`` on each side, d = ``offset``), the end slices repeated beyond the scan's ends."""
    z = np.asarray(z)
    steps = [0] + [sign * k * offset for k in range(1, per_side + 1) for sign in (-1, 1)]
    return [np.clip(z + d, 0, n_slices - 1) for d in steps]


def slice_stack(hu: np.ndarray, z: np.ndarray, offset: int, per_side: int, size: int, windowed) -> "torch.Tensor":
    """(S, 1 + 2·per_side, size, size): slices z of a volume (Z, Y, X) and their neighbours (``context_indices``),
    each through ``windowed`` (HU → [−1, 1]) and onto the model grid (air −1 as padding) — the stacks of the 2.5D
    diffusion model (``model_inputs``) and of the lung network (``lungnet.slice_stacks``)."""
    import torch

    planes = [to_model_grid(torch.from_numpy(windowed(hu[i])), size, pad_value=-1.0)
              for i in context_indices(z, offset, per_side, hu.shape[0])]
    return planes[0] if len(planes) == 1 else torch.cat(planes, 1)


def model_inputs(hu: np.ndarray, lung: np.ndarray, cfg: PreprocessConfig, z: Optional[np.ndarray] = None,
                 offset: int = 1, context: int = 0) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Slices z (all when None) of a volume (Z, Y, X) in HU and of its lung mask → the network's image x₀
    (S, 1 + 2·context, size, size: the slice, then its neighbours, ``slice_stack``) and condition c (the
    slice's lung mask, S, 1, size, size): windowed to [−1, 1] (Section 3.1) and put on the model grid (air −1 / no
    lung 0 as padding). The one preparation of slices, for training and detection alike."""
    import torch

    z = np.arange(hu.shape[0]) if z is None else np.asarray(z)
    x = slice_stack(hu, z, offset, context, cfg.image_size, lambda v: window(v, cfg))
    c = to_model_grid(torch.from_numpy(lung[z] > 0), cfg.image_size, 0.0, mask=True)
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


WRITABLE = (".nii.gz", ".nii", ".nrrd", ".mha")  # single-file formats that hold 3D geometry


def check_writable_format(path) -> None:
    """Refuse, before any work, an output name whose format cannot hold a 3D image with its geometry (a .png is
    one 2D slice; .xyz is no format ITK knows) or that spreads over two files (.nhdr/.mhd + raw)."""
    name = Path(path).name.lower()
    if not any(name.endswith(s) for s in WRITABLE):
        raise SACDiffError(f"cannot write {path}: give an output name ending in {', '.join(WRITABLE)} (formats that "
                           "keep the 3D geometry)")


def verify_written(path: Path, array: np.ndarray, reference: sitk.Image) -> None:
    """Read back what was written: the file is complete (``check_complete``: ITK's writer does not report a full
    disk) and its header holds the array's size and the reference's geometry."""
    try:
        reader = read_header(path)
    except SACDiffError as exc:  # its advice is for an input ("download it again"); this is our own output
        raise SACDiffError(f"writing {path.name} failed: it cannot be read back ({exc}); free space or choose "
                           "another --out") from None
    same = (tuple(reader.GetSize()) == tuple(reversed(array.shape))
            and all(np.allclose(getattr(reader, g)(), getattr(reference, g)(), atol=1e-3, rtol=0)
                    for g in ("GetSpacing", "GetOrigin", "GetDirection")))
    if not same:
        raise SACDiffError(f"writing {path.name} failed: the file read back has another size or geometry; free "
                           "space or choose another --out")
    if not path.name.lower().endswith(".nii") and not path.name.lower().endswith(".nii.gz"):
        back = sitk.GetArrayViewFromImage(sitk.ReadImage(str(path)))  # NRRD/MHA: the data themselves
        if back.shape != array.shape:
            raise SACDiffError(f"writing {path.name} failed: the data read back are incomplete; free space")


def write_image(array: np.ndarray, reference: sitk.Image, path) -> Path:
    """Write ``array`` with the reference's geometry, via a temporary name renamed when complete and read back
    (``verify_written``) before it is put in place."""
    path = Path(path)
    check_writable_format(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-w{''.join(path.suffixes)}")  # the suffix picks the format
    try:
        sitk.WriteImage(image_like(array, reference), str(tmp), useCompression=True)
        verify_written(tmp, array, reference)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
