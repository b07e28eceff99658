"""SACDiffLib's Python packages inside Slicer: checked without importing them, installed on the user's word.

``requirements.txt`` (beside this file, installed with the module) lists the pip packages; numpy and SimpleITK come
with Slicer and are never installed or upgraded here; torch comes from the SlicerPyTorch extension with a minimum
version. Slicer ≥ 5.12 installs through ``slicer.packaging.pip_ensure`` (skipping what Slicer provides; the panel
has asked already, so no second prompt); 5.8–5.10 through ``slicer.util.pip_install`` with a pip constraints file
that pins numpy, SimpleITK and torch at their installed versions. No Qt here: the widget asks the user first.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re
from pathlib import Path

REQUIREMENTS_FILE = Path(__file__).with_name("requirements.txt")
IMPORT_NAMES = {"scipy": "scipy", "scikit-image": "skimage", "opensimplex": "opensimplex", "tqdm": "tqdm"}
SLICER_PROVIDES = ("numpy", "SimpleITK", "torch")  # never installed or upgraded by SACDiff
TORCH_MINIMUM = (2, 1)  # torch.compile and bf16 autocast as SACDiffLib uses them


def requirements() -> list[str]:
    """The pip requirement strings of requirements.txt."""
    lines = REQUIREMENTS_FILE.read_text(encoding="utf-8").splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[;]", requirement, maxsplit=1)[0]


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:2])


def torchTooOld() -> bool:
    try:
        return _version_tuple(importlib.metadata.version("torch")) < TORCH_MINIMUM
    except importlib.metadata.PackageNotFoundError:
        return False


def missingDependencies() -> list[str]:
    """What is missing, by pip name ('torch' also when older than TORCH_MINIMUM); nothing is imported."""
    missing = [_name(r) for r in requirements() if importlib.util.find_spec(IMPORT_NAMES[_name(r)]) is None]
    if importlib.util.find_spec("torch") is None or torchTooOld():
        missing.insert(0, "torch")
    return missing


def _pins_of_what_slicer_provides() -> str:
    """pip constraints: numpy, SimpleITK and torch at their installed versions (pip may then install nothing that
    would upgrade or replace them)."""
    pins = []
    for name in SLICER_PROVIDES:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return "\n".join(pins) + "\n"


def installDependencies(missing: list[str]) -> None:
    """Install ``missing`` (from ``missingDependencies``); raises RuntimeError with what to do when it fails."""
    import slicer

    if "torch" in missing:
        try:
            import PyTorchUtils
        except ImportError:
            raise RuntimeError("the PyTorch extension is not installed: install 'PyTorch' from the Extensions "
                               "Manager, restart Slicer and try again") from None
        wanted = ">=" + ".".join(map(str, TORCH_MINIMUM))
        try:  # SlicerPyTorch raises when it cannot install (it never returns None for a failure)
            PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=wanted)
        except Exception as exc:
            raise RuntimeError(f"PyTorch {wanted} could not be installed ({exc}); install it from the PyTorch module "
                               "(Utilities › PyTorch Utils), restart Slicer and try again") from None
    wanted = [r for r in requirements() if _name(r) in missing]
    if not wanted:
        return
    try:  # a submodule from Slicer 5.12 on (slicer/packaging.py); absent in 5.8 and 5.10
        packaging_module = importlib.import_module("slicer.packaging")
    except ImportError:
        packaging_module = None
    if packaging_module is not None and hasattr(packaging_module, "pip_ensure"):
        from packaging.requirements import Requirement

        packaging_module.pip_ensure([Requirement(r) for r in wanted], skip_packages=list(SLICER_PROVIDES),
                                    prompt_install=False, requester="SACDiff")
    else:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="SACDiff-pip-") as folder:
            constraints = Path(folder) / "constraints.txt"
            constraints.write_text(_pins_of_what_slicer_provides(), encoding="utf-8")
            slicer.util.pip_install(wanted + ["-c", str(constraints)])
    still = missingDependencies()
    if still:
        raise RuntimeError(f"still missing after installation: {', '.join(still)}; see the Python console")
