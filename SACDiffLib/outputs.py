"""Writers for a detection run: NIfTI maps, report.json, overview.png — all or nothing.

A run folder is assembled under a temporary name beside the target and renamed into place when complete, so an
interrupted run never leaves a half-written folder. ``load_run`` reads a finished folder back for re-thresholding.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk

from . import __version__, io
from .atomic import MARKER, Output, identity, replaced_file
from .config import PreprocessConfig, detect_from_dict
from .errors import SACDiffError
from .postprocess import Threshold
from .result import DetectionResult, read_report, report_text

FILES = {
    "anomaly_map": "anomaly_map.nii.gz",
    "uncertainty": "uncertainty.nii.gz",
    "pseudo_healthy": "pseudo_healthy.nii.gz",
    "anomaly_mask": "anomaly_mask.nii.gz",
    "lung_mask": "lung_mask.nii.gz",
    "report": "report.json",
    "overview": "overview.png",
}


def check_out_dir(out_dir, overwrite: bool, inputs=()) -> Output:
    """The run folder's ``atomic.Output``, checked before any work is done (see ``atomic``)."""
    return Output(out_dir, "run", overwrite, inputs)


def versions() -> dict:
    import scipy
    import skimage

    return {
        "sacdiff": __version__,
        "torch": str(getattr(sys.modules.get("torch"), "__version__", "not loaded")),
        "numpy": np.__version__,
        "SimpleITK": sitk.Version_VersionString(),
        "scipy": scipy.__version__,
        "scikit-image": skimage.__version__,
        "python": platform.python_version(),
    }


def write_run(result: DetectionResult, out, overwrite: bool = False, extra=None) -> Path:
    """Every file of a run, verified finite, assembled under a temporary name and put in place whole. ``out`` is a
    path or the ``Output`` that ``check_out_dir`` prepared before the work; ``extra(folder)`` may add files (the
    DICOM SEG) before the run is put in place."""
    output = out if isinstance(out, Output) else check_out_dir(out, overwrite, [result.facts.get("ct")])
    check_finite(result)
    t0 = time.perf_counter()
    with output as tmp:
        write_files(result, tmp)
        if extra is not None:
            extra(tmp)
    # in memory for callers (the timing of the writing itself cannot be inside the report it writes)
    result.facts.setdefault("timings", {})["write_s"] = round(time.perf_counter() - t0, 3)
    return output.target


def check_finite(result: DetectionResult) -> None:
    """A non-finite map or α is an error, never a result."""
    for name, array in (("anomaly map", result.error), ("uncertainty", result.uncertainty_hu),
                        ("pseudo-healthy", result.pseudo_healthy_hu)):
        if array is not None and not np.isfinite(array).all():
            raise SACDiffError(f"the {name} holds NaN/infinite values; nothing was written (broken model or input)")
    if result.threshold is not None and not np.isfinite(result.threshold.alpha):
        raise SACDiffError(f"the threshold α = {result.threshold.alpha} is not finite; nothing was written")


def write_files(result: DetectionResult, folder: Path) -> None:
    ref = result.reference
    io.write_image(result.error.astype(np.float32), ref, folder / FILES["anomaly_map"])
    io.write_image(result.uncertainty_hu.astype(np.float32), ref, folder / FILES["uncertainty"])
    io.write_image(result.pseudo_healthy_hu.astype(np.float32), ref, folder / FILES["pseudo_healthy"])
    io.write_image(result.mask.astype(np.uint8), ref, folder / FILES["anomaly_mask"])
    io.write_image(result.lung.astype(np.uint8), ref, folder / FILES["lung_mask"])
    _write_report(result, folder)
    write_overview(result, folder / FILES["overview"])


def _write_report(result: DetectionResult, folder: Path) -> None:
    (folder / FILES["report"]).write_text(report_text(result, versions()), encoding="utf-8")


def load_run(run_dir) -> DetectionResult:
    """A finished run folder back as a DetectionResult (maps, lung, processed slices, settings)."""
    run_dir = Path(run_dir)
    run_identity = identity(run_dir)  # before reading: a rewrite must replace exactly this run (atomic.Output)
    missing = [f for k, f in FILES.items() if k in ("anomaly_map", "lung_mask", "report") and not (run_dir / f).exists()]
    if not run_dir.is_dir() or missing:
        raise SACDiffError(
            f"{run_dir} is not a finished `sacdiff detect` folder (missing: {', '.join(missing) or 'the folder'}); "
            "run `sacdiff detect` first"
        )
    damaged = f"; the run in {run_dir} is damaged: run `sacdiff detect` again"
    report = read_report(run_dir / FILES["report"], damaged)
    error_img = io.read_image(run_dir / FILES["anomaly_map"])
    lung_img = io.read_image(run_dir / FILES["lung_mask"])
    if io.geometry_differences(error_img, lung_img):
        raise SACDiffError(f"the lung mask and the anomaly map of {run_dir} have different geometries{damaged}")
    lung = sitk.GetArrayFromImage(lung_img).astype(np.uint8)
    error = sitk.GetArrayFromImage(error_img).astype(np.float32)
    if not np.isfinite(error).all():
        raise SACDiffError(f"the anomaly map of {run_dir} holds NaN/infinite values{damaged}")
    try:
        det = detect_from_dict(report["detect"])
        processed = np.asarray(report["processed_slices"], dtype=np.int64)
        th = Threshold.from_report(report["threshold"])
    except (TypeError, ValueError, KeyError, SACDiffError) as exc:
        raise SACDiffError(f"{run_dir / FILES['report']} has unexpected settings ({exc}){damaged}") from None
    if processed.size and (processed.min() < 0 or processed.max() >= error.shape[0]):
        raise SACDiffError(f"{run_dir / FILES['report']} names slices outside the map{damaged}")
    mask = _read_optional(run_dir / FILES["anomaly_mask"], np.uint8)
    uncertainty = _read_optional(run_dir / FILES["uncertainty"])
    # For the overview and the body mask only: the original CT when it is still where it was (else
    # ``DetectionResult.anatomy_hu`` falls back on the pseudo-healthy volume).
    ct = None
    ct_source = Path(report["ct"]) if report.get("ct") else None  # (Path("") would be the working folder)
    if ct_source is not None and not (ct_source.is_absolute() and report.get("ct_fingerprint") == io.fingerprint(
            ct_source)):
        ct_source = None  # moved, changed, or a relative path of an older run (relative to an unknown folder)
    if ct_source is not None:
        try:
            ct_img = io.read_image(ct_source)
            if not io.geometry_differences(error_img, ct_img):
                ct = io.ct_array(ct_img)
        except SACDiffError:
            ct = None
    pseudo = _read_optional(run_dir / FILES["pseudo_healthy"]) if ct is None else None
    box = report.get("analysis_box")
    return DetectionResult(reference=error_img, ct_hu=ct, lung=lung, processed=processed, error=error,
                           uncertainty_hu=uncertainty, pseudo_healthy_hu=pseudo, detect=det, mask=mask, threshold=th,
                           quantification=report.get("quantification", {}), facts=report,
                           box=None if box is None else tuple(int(v) for v in box), run_identity=run_identity)


def _read_optional(path: Path, dtype=np.float32) -> Optional[np.ndarray]:
    return sitk.GetArrayFromImage(io.read_image(path)).astype(dtype) if path.exists() else None


def write_threshold_update(result: DetectionResult, run_dir, extra=None) -> Path:
    """A run after re-thresholding, replaced as a whole: a copy of the folder (unchanged files hard-linked) with the
    new anomaly_mask, report and overview is exchanged with the old one in one step, so a reader never sees a mask
    and a report of different λ. ``extra(folder)`` may add files (the Slicer export)."""
    run_dir = Path(run_dir)
    check_finite(result)
    output = Output(run_dir, "run", overwrite=True, started_from=result.run_identity)
    with output as tmp:
        for item in run_dir.iterdir():
            if item.name in (FILES["anomaly_mask"], FILES["report"], FILES["overview"], MARKER) or item.is_dir():
                continue
            try:
                os.link(item, tmp / item.name)
            except OSError:
                shutil.copy2(item, tmp / item.name)
        io.write_image(result.mask.astype(np.uint8), result.reference, tmp / FILES["anomaly_mask"])
        _write_report(result, tmp)
        write_overview(result, tmp / FILES["overview"])
        if extra is not None:
            extra(tmp)
    result.run_identity = output.committed  # the next rewrite (the λ slider again) replaces this one
    return run_dir


# --- overview.png -----------------------------------------------------------------------------------------------


def _hot(v: np.ndarray) -> np.ndarray:
    v = np.clip(v, 0, 1)
    return np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], -1)


_WINDOW = PreprocessConfig()  # the paper's lung window (W 1500, L −600) for the pictures


def _grey(hu: np.ndarray, lo=_WINDOW.hu_min, hi=_WINDOW.hu_max) -> np.ndarray:
    g = np.clip((hu - lo) / (hi - lo), 0, 1)
    return np.stack([g, g, g], -1)


def _overlay(base: np.ndarray, mask: np.ndarray, colour, alpha=0.5) -> np.ndarray:
    out = base.copy()
    out[mask > 0] = (1 - alpha) * out[mask > 0] + alpha * np.asarray(colour)
    return out


def overview_slices(result: DetectionResult, count: int = 4) -> np.ndarray:
    """The slices to show: those with the most anomaly, else evenly spaced lung slices."""
    processed = result.processed
    if result.mask is not None and result.mask[processed].any():
        per_slice = result.mask[processed].reshape(len(processed), -1).sum(1)
        best = processed[np.argsort(per_slice)[::-1][:count]]
        return np.sort(best)
    return processed[np.linspace(0, len(processed) - 1, min(count, len(processed))).round().astype(int)]


def _wrap(draw, text: str, width: float) -> list[str]:
    """``text`` broken at spaces into lines no wider than ``width`` pixels (a single long word stays whole)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines or [""]


def write_overview(result: DetectionResult, path, truth: Optional[np.ndarray] = None) -> Path:
    """A PNG grid, one row per chosen axial slice: CT | error map | anomaly mask (red; truth in green when
    given) | uncertainty."""
    from PIL import Image, ImageDraw

    path = Path(path)
    zs = overview_slices(result)
    # Display ranges: 99.5th percentiles over the shown slices (cheap; the whole volume is not needed for a picture).
    lung_error = result.error[zs][result.lung[zs] > 0]
    emax = float(np.percentile(lung_error, 99.5)) if lung_error.size else 1.0
    emax = emax if emax > 0 else 1.0
    unc = result.uncertainty_hu
    umax = float(np.percentile(unc[zs], 99.5)) if unc is not None else 1.0
    umax = umax if umax > 0 else 1.0
    ct = result.anatomy_hu()
    rows = []
    for z in zs:
        base = _grey(ct[z]) if ct is not None else _hot(result.error[z] * 0)
        mask_panel = _overlay(base, result.mask[z], (1, 0, 0))
        if truth is not None:
            mask_panel = _overlay(mask_panel, truth[z], (0, 1, 0), 0.35)
        panels = [base, _hot(result.error[z] / emax), mask_panel]
        panels.append(_hot(unc[z] / umax) if unc is not None else base * 0)
        rows.append(np.concatenate(panels, axis=1))
    grid = (np.concatenate(rows, axis=0) * 255).astype(np.uint8)
    # The arrays are (y, x) in index order; flip nothing — this is how the voxels are stored.
    width = grid.shape[1] // 4
    titles = ["CT", "error map", "anomaly (red)" + (", truth (green)" if truth is not None else ""), "uncertainty"]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = [_wrap(probe, title, width - 8) for title in titles]  # each title within its own column
    header = 4 + 13 * max(len(t) for t in lines)
    image = Image.new("RGB", (grid.shape[1], grid.shape[0] + header), "black")
    image.paste(Image.fromarray(grid), (0, header))
    draw = ImageDraw.Draw(image)
    for i, title_lines in enumerate(lines):
        for j, line in enumerate(title_lines):
            draw.text((i * width + 4, 3 + 13 * j), line, fill="white")
    with replaced_file(path) as tmp:
        image.save(tmp, format="PNG")
    return path
