"""The result of one detection and its ``report.json``: the one place both are defined, composed and read.

``report.json`` (``REPORT_VERSION``), keys in the order written:

- the binarisation, composed anew after every λ (``postprocess.rethreshold``): ``lambda``, ``threshold`` (α,
  the background's location and scale, λ, mode, statistic, region; Section 2.4), ``crf``, ``processed_slices``
  (z indices run through the model), ``analysis_box`` ((y0, y1, x0, x1) of the network's in-plane crop on the CT
  grid, or null), ``quantification`` (``postprocess.quantify``: ml and % per lung, ml per slice);
- the detection's facts (``detection_facts``): ``ct`` (absolute path), ``ct_fingerprint`` (``io.fingerprint``),
  ``lung_mask`` (where the mask came from), ``device``, ``timings`` (seconds per stage), ``network_evaluations``,
  ``processed_voxel_fraction``, ``chunk`` (slices per forward, out-of-memory retries, compiled, noise seconds),
  ``config`` (every setting of the model and the detection), ``vessel_suppression`` (only when asked: "applied"
  or why it was skipped); a later version's unknown keys are kept here;
- ``sacdiff_report_version``, ``seed``, ``detect`` (the detection settings after the last λ), ``versions`` (of the
  libraries that made the maps), ``slice_scores`` (= quantification's ml per slice), ``units``, and
  ``threshold_versions`` once a `threshold` run (no torch) re-binarised it.

NaN (an undefined ratio) is written as null; any other non-finite number is an error (strict JSON).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import SimpleITK as sitk

from .config import DetectConfig
from .errors import SACDiffError

if TYPE_CHECKING:
    from .postprocess import Threshold

REPORT_VERSION = 1

# The keys composed from the result's fields (``report_document``); everything else a report holds is a fact.
_BINARISATION = ("lambda", "threshold", "crf", "processed_slices", "analysis_box", "quantification")
_TRAILER = ("sacdiff_report_version", "seed", "detect", "versions", "slice_scores", "units", "threshold_versions")
REQUIRED_KEYS = ("detect", "processed_slices", "threshold")  # what re-thresholding a finished run needs

UNITS = {
    "anomaly_map": "squared error of the [-1, 1] windowed image",
    "uncertainty": "HU (std over the K reconstructions)",
    "pseudo_healthy": "HU (window-clipped mean reconstruction on processed slices, the CT elsewhere)",
    "volumes": "ml",
    "slice_scores": "anomaly volume per slice (ml), in the CT's z order",
}


@dataclass(kw_only=True)
class DetectionResult:
    """One detection on the CT grid (z, y, x): what a run folder holds, in memory. Built by keyword only."""

    reference: sitk.Image  # the CT's geometry (every output is written on it)
    ct_hu: Optional[np.ndarray]  # the CT in HU; None for a loaded run whose CT moved or changed
    lung: np.ndarray  # uint8 labels 1 right / 2 left
    processed: np.ndarray  # z indices of the slices run through the model
    error: np.ndarray  # E on the CT grid (windowed units², 0 on unprocessed slices)
    uncertainty_hu: Optional[np.ndarray]  # σ over the K members (Section 2.5), HU
    pseudo_healthy_hu: Optional[np.ndarray]  # the member mean, HU (the CT outside the processed slices)
    detect: DetectConfig  # the detection settings, λ included (replaced by every re-thresholding)
    mask: Optional[np.ndarray] = None  # uint8 anomaly mask (after ``rethreshold``)
    threshold: Optional[Threshold] = None  # α and the background's statistics (after ``rethreshold``)
    quantification: dict = field(default_factory=dict)  # ``postprocess.quantify`` of the mask
    facts: dict = field(default_factory=dict)  # the detection's facts (``detection_facts``) or a loaded report's
    box: Optional[tuple[int, int, int, int]] = None  # (y0, y1, x0, x1) on the CT grid: the network's crop box
    body: Optional[np.ndarray] = None  # bool (z, y, x): the patient's body (``lung.body_mask``), made on first use
    lung_voxels: Optional[np.ndarray] = None  # voxels per lung label, counted once (the λ slider re-uses it)
    run_identity: Optional[tuple] = None  # the run folder this result was loaded from (``atomic.identity``)

    def anatomy_hu(self) -> Optional[np.ndarray]:
        """The CT, or where a loaded run's CT is gone, its pseudo-healthy volume (the CT outside the processed
        slices): for pictures and the body mask, never for scores."""
        return self.ct_hu if self.ct_hu is not None else self.pseudo_healthy_hu


def detection_facts(*, ct_path, ct_fingerprint: str, lung_origin: str, device, timings: dict,
                    network_evaluations: int, processed_voxel_fraction: float, chunk: dict, config: dict,
                    vessel_suppression: Optional[str] = None) -> dict:
    """The facts a detection records in its report (module docstring), in the order written; ``vessel_suppression``
    (what ``vessels.suppress_vessels`` did) only when it was asked for."""
    facts = {
        "ct": str(Path(ct_path).resolve()),  # absolute: a later `threshold` may run from another folder
        "ct_fingerprint": ct_fingerprint,
        "lung_mask": lung_origin,
        "device": str(device),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "network_evaluations": int(network_evaluations),
        # fraction of the CT's voxels the network ran on (lung slices × in-plane box on the model grid)
        "processed_voxel_fraction": round(processed_voxel_fraction, 4),
        "chunk": chunk,
        "config": config,
    }
    if vessel_suppression is not None:
        facts["vessel_suppression"] = vessel_suppression
    return facts


def report_document(result: DetectionResult, versions: dict) -> dict:
    """``report.json``'s content for ``result`` (module docstring); ``versions``: the libraries now loaded (those
    that made the maps for a new run; for a re-thresholded one they are recorded as ``threshold_versions``)."""
    q = result.quantification
    doc = {
        "lambda": result.detect.lam,
        "threshold": dataclasses.asdict(result.threshold),
        "crf": result.detect.crf,
        "processed_slices": result.processed.tolist(),
        "analysis_box": None if result.box is None else list(result.box),
        "quantification": q,
    }
    doc.update((k, v) for k, v in result.facts.items() if k not in _BINARISATION and k not in _TRAILER)
    doc["sacdiff_report_version"] = REPORT_VERSION
    doc["seed"] = result.detect.seed
    doc["detect"] = dataclasses.asdict(result.detect)
    doc["versions"] = result.facts.get("versions") or versions
    doc["slice_scores"] = q.get("slice_anomaly_ml", [])
    doc["units"] = UNITS
    if "versions" in result.facts:
        doc["threshold_versions"] = {k: v for k, v in versions.items() if k != "torch"}
    return _undefined_as_null(doc)


def report_text(result: DetectionResult, versions: dict) -> str:
    return json.dumps(report_document(result, versions), indent=1, default=_json_default, allow_nan=False)


def read_report(path: Path, damaged: str) -> dict:
    """A finished run's report.json, checked for what re-thresholding needs; ``damaged`` ends every message."""
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SACDiffError(f"{path} is not valid JSON ({exc}){damaged}") from None
    if not isinstance(report, dict):
        raise SACDiffError(f"{path} is not a SACDiff report{damaged}")
    missing = [k for k in REQUIRED_KEYS if k not in report]
    if missing:
        raise SACDiffError(f"{path} lacks {', '.join(missing)}{damaged}")
    return report


def _undefined_as_null(value):
    """NaN (an undefined ratio, e.g. % of a lung the mask does not have) → null; infinity stays an error."""
    if isinstance(value, dict):
        return {k: _undefined_as_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_undefined_as_null(v) for v in value]
    if isinstance(value, (float, np.floating)) and np.isnan(value):
        return None
    return value


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (tuple, set)):
        return list(value)
    return str(value)
