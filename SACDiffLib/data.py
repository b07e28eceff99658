"""The data-folder layout (like ``../shared/data``), in one place: ``cases.json`` beside ``ct/``.

    cases.json              {case: {"diagnosis": "normal" | ..., optional "slice_label_infection": [0/1 per slice]}}
    ct/<case>_ct.nii.gz     the CT in HU
    ct/<case>_lung.nii.gz   its lung mask (optional for detection: the fallback makes one)
    ct/<case>_lesion.nii.gz a lesion mask (optional; evaluation only — training never reads it)

and the validation hold-out of the healthy cases' lung slices (``holdout_split``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import SACDiffError

KINDS = ("ct", "lung", "lesion")
HOLDOUT_SLAB = 8  # consecutive slices per hold-out slab: neighbouring slices are near copies of each other


def load_cases(data_dir) -> dict:
    """``cases.json`` of a data folder, checked to be a mapping of case names to descriptions."""
    data_dir = Path(data_dir)
    index = data_dir / "cases.json"
    if not index.is_file():
        raise SACDiffError(
            f"{data_dir} has no cases.json; lay the folder out as cases.json + ct/<case>_ct.nii.gz + "
            "ct/<case>_lung.nii.gz (see README, 'Data layout')"
        )
    try:
        cases = json.loads(index.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SACDiffError(f"{index} is not valid JSON ({exc})") from None
    if not isinstance(cases, dict):
        raise SACDiffError(f"{index} must map case names to their descriptions")
    for name, description in cases.items():
        check_case_name(name, str(index))
        if not isinstance(description, dict):
            raise SACDiffError(f"{index}: case {name!r} must be described by an object ({{\"diagnosis\": ...}}), "
                               f"not {type(description).__name__}")
    return cases


CASE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_case_name(name, where: str) -> None:
    """A case name becomes a file and folder name (``ct/<case>_ct.nii.gz``, ``runs/<case>``): letters, digits,
    ``.``, ``_`` and ``-`` only, starting with a letter or digit — no separator, no ``..``, no absolute path, so an
    output can never land outside its folder."""
    if not isinstance(name, str) or not CASE_NAME.fullmatch(name) or ".." in name:
        raise SACDiffError(f"{where}: case name {name!r} is not usable as a file name (letters, digits, '.', '_', '-'; "
                           "no '/', '..' or spaces; at most 128 characters); rename the case")


def case_path(data_dir, case: str, kind: str) -> Path:
    """``ct/<case>_<kind>.nii.gz`` for kind ct, lung or lesion."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {KINDS}")
    return Path(data_dir) / "ct" / f"{case}_{kind}.nii.gz"


def optional_path(data_dir, case: str, kind: str) -> Optional[Path]:
    path = case_path(data_dir, case, kind)
    return path if path.exists() else None


def healthy_cases(cases: dict, normal_cases: Optional[list] = None) -> list[str]:
    """Cases to treat as healthy: the ones named in ``normal_cases``, else those whose diagnosis is exactly
    ``normal``. Names that cases.json does not list are refused."""
    if normal_cases:
        unknown = sorted(set(normal_cases) - set(cases))
        if unknown:
            raise SACDiffError(f"--normal-cases names cases that cases.json does not list: {unknown}")
        return sorted(normal_cases)
    return sorted(name for name, info in cases.items() if info.get("diagnosis") == "normal")


def holdout_split(z: np.ndarray, every: int) -> tuple[np.ndarray, np.ndarray]:
    """(training slices, held-out slices) of the lung slice indices ``z``: slabs of HOLDOUT_SLAB consecutive
    lung slices, every ``every``-th slab held out, starting with the second so that both ends train."""
    if not every:
        return z, z[:0]
    slab = np.arange(z.size) // HOLDOUT_SLAB
    held = (slab % every) == (1 % every)
    return z[~held], z[held]
