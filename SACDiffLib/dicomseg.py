"""The anomaly mask as a DICOM Segmentation object, for PACS and annotation tools without Slicer.

highdicom (optional: ``pip install sacdiff[dicom]``) writes it, because a SEG object is exactly what that
well-kept library is for: the referenced series and instances, the frame of reference, the segment's coded
terminology and the algorithm identification are checked against the standard there, not by hand here.

The segment is coded as the Slicer module codes it (``SACDiff/SACDiffModuleLib/logic.py``: ANOMALY_TERMINOLOGY):
category Morphologically Altered Structure (SCT 49755003), type Mass (SCT 4147007), anatomic region Lung
(SCT 39607008); algorithm "SACDiff" with its version and the model's file name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import SACDiffError

SEG_FILE = "anomaly.seg.dcm"
CATEGORY = ("49755003", "SCT", "Morphologically Altered Structure")
TYPE = ("4147007", "SCT", "Mass")
REGION = ("39607008", "SCT", "Lung")


def require_highdicom():
    try:
        import highdicom  # noqa: F401
        import pydicom  # noqa: F401
    except ImportError:
        raise SACDiffError("--dicom-seg needs highdicom: pip install 'sacdiff[dicom]' (or pip install highdicom), "
                           "or drop --dicom-seg") from None


def series_files(folder) -> list[Path]:
    """The files of the one DICOM series in ``folder``, in the order SimpleITK reads them into z (``io.read_image``)."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    ids = reader.GetGDCMSeriesIDs(str(folder))
    if len(ids) != 1:
        raise SACDiffError(f"{folder} must hold exactly one DICOM series for --dicom-seg")
    return [Path(p) for p in reader.GetGDCMSeriesFileNames(str(folder), ids[0])]


def check_source(ct_path) -> None:
    """Before any work: --dicom-seg needs a DICOM series (a SEG object references its instances) and highdicom."""
    require_highdicom()
    if not Path(ct_path).is_dir():
        raise SACDiffError(f"--dicom-seg needs the CT as a DICOM series folder (a DICOM SEG references the CT's "
                           f"instances); {ct_path} is a file: drop --dicom-seg (the NIfTI mask is written anyway)")


def write_dicom_seg(mask: np.ndarray, ct_folder, path, model_name: str = "", lam: float | None = None) -> Path:
    """``mask`` (z, y, x; z in SimpleITK's reading order of the series) → a binary DICOM SEG at ``path``."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    from . import __version__

    files = series_files(ct_folder)
    if len(files) != mask.shape[0]:
        raise SACDiffError(f"the series in {ct_folder} has {len(files)} files for {mask.shape[0]} slices")
    sources = [pydicom.dcmread(str(f)) for f in files]
    for ds in sources:
        if (ds.Rows, ds.Columns) != mask.shape[1:]:
            raise SACDiffError(f"DICOM instance {ds.SOPInstanceUID} has another size than the mask")
    algorithm = hd.AlgorithmIdentificationSequence(
        name="SACDiff", version=__version__, family=codes.cid7162.ArtificialIntelligence,
        parameters={k: v for k, v in (("model", model_name), ("lambda", None if lam is None else f"{lam:g}")) if v})
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="Anomaly",
        segmented_property_category=Code(*CATEGORY), segmented_property_type=Code(*TYPE),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
        anatomic_regions=[Code(*REGION)], tracking_id="SACDiff anomaly", tracking_uid=hd.UID())
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=(mask > 0).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[segment],
        series_instance_uid=hd.UID(), series_number=9901, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="SACDiff", manufacturer_model_name="SACDiff", software_versions=__version__,
        device_serial_number="0", series_description="SACDiff anomaly (research use only)",
        omit_empty_frames=False)
    seg.save_as(str(path))
    return Path(path)
