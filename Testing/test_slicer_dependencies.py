"""The module's package handling (``SACDiffModuleLib/dependencies.py``) and the CMake file lists.

``slicer`` and ``PyTorchUtils`` are STAND-INS here (tiny recording fakes, labelled as such): the real ones exist only
inside the Slicer application. What is checked is SACDiff's own decisions: what it asks pip for, what it never
touches, and that a failed PyTorch installation is an error, not silence."""

from __future__ import annotations

import re
import sys
import types

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "SACDiff"))
from SACDiffModuleLib import dependencies  # noqa: E402


def test_requirements_are_wheels_only_and_never_what_slicer_provides():
    reqs = dependencies.requirements()
    names = [re.split(r"[<>=!~ ]", r)[0] for r in reqs]
    assert set(names) == set(dependencies.IMPORT_NAMES)  # every requirement has its import name
    assert not {n.lower() for n in names} & {p.lower() for p in dependencies.SLICER_PROVIDES}
    assert not any("densecrf" in n for n in names)  # the only package that needed a compiler is gone


@pytest.mark.parametrize("version, old", [("2.0.1+cu118", True), ("2.1.0", False), ("2.13.0", False)])
def test_torch_older_than_the_minimum_counts_as_missing(monkeypatch, version, old):
    monkeypatch.setattr(dependencies.importlib.metadata, "version", lambda name: version)
    assert dependencies.torchTooOld() is old


class _Recorder:
    def __init__(self, result=True):
        self.calls, self.result = [], result

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.result


def _stand_in_slicer(monkeypatch, with_packaging: bool):
    fake = types.SimpleNamespace(util=types.SimpleNamespace(pip_install=_Recorder()))
    monkeypatch.setitem(sys.modules, "slicer", fake)
    if with_packaging:  # a submodule, as in Slicer ≥ 5.12 (slicer/packaging.py; imported, not an attribute read)
        fake.packaging = types.SimpleNamespace(pip_ensure=_Recorder())
        monkeypatch.setitem(sys.modules, "slicer.packaging", fake.packaging)
    else:
        monkeypatch.delitem(sys.modules, "slicer.packaging", raising=False)
    monkeypatch.setattr(dependencies, "missingDependencies", lambda: [])
    return fake


def test_slicer_5_12_installs_through_packaging_skipping_what_slicer_provides(monkeypatch):
    fake = _stand_in_slicer(monkeypatch, with_packaging=True)
    dependencies.installDependencies(["scikit-image", "tqdm"])
    (args, kwargs), = fake.packaging.pip_ensure.calls
    assert sorted(str(r).split(">")[0] for r in args[0]) == ["scikit-image", "tqdm"]
    assert set(kwargs["skip_packages"]) == {"numpy", "SimpleITK", "torch"} and kwargs["requester"] == "SACDiff"
    assert not fake.util.pip_install.calls


def test_older_slicer_installs_through_pip_install(monkeypatch):
    fake = _stand_in_slicer(monkeypatch, with_packaging=False)
    dependencies.installDependencies(["opensimplex"])
    (args, _), = fake.util.pip_install.calls
    assert args[0][0].startswith("opensimplex>=") and args[0][1] == "-c"


def test_a_failed_pytorch_installation_is_an_error_with_the_minimum_version(monkeypatch):
    _stand_in_slicer(monkeypatch, with_packaging=True)

    def install(**kwargs):  # SlicerPyTorch raises when it cannot install
        install.kwargs = kwargs
        raise RuntimeError("no wheel for this platform")

    logic = types.SimpleNamespace(installTorch=install)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=lambda: logic))
    with pytest.raises(RuntimeError, match=r"PyTorch >=2\.1 could not be installed \(no wheel for this platform\)"):
        dependencies.installDependencies(["torch"])
    assert install.kwargs["torchVersionRequirement"] == ">=2.1"
