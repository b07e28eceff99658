"""The SACDiff panel as Slicer runs it, for tests: Slicer's own Python at a release tag on real MRML.

``slicer_release(tag, tmp)`` puts ``../shared/slicer-python/<tag>/slicer`` first on the ``slicer`` package's path,
so that ``slicer.util``, ``slicer.i18n``, ``slicer.parameterNodeWrapper`` and ``slicer.ScriptedLoadableModule`` are
that release's real files, on top of ``slicer-core``'s real MRML; only PythonQt and the CTK / qMRML widgets are
emulated (``pythonqt_emulation.py``, which says what it promises), plus the application object ``slicer.app``
(a module manager, a temporary folder) and the message boxes (recorded in ``Panel.dialogs``). Everything is put
back on exit, so the other tests keep ``slicer-core``'s own ``util``.

``Panel`` loads the module the way Slicer's ``qSlicerScriptedLoadableModule`` does — the module file executed as
module ``SACDiff`` with its folder on ``sys.path``, ``SACDiff(parent)`` for the module, ``SACDiffWidget(parent)``
then ``setup()`` and ``enter()`` for the panel — and drives it as a user would.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import time
import types
from pathlib import Path

from conftest import ROOT

SLICER_PYTHON = ROOT.parent / "shared" / "slicer-python"
TAGS = ("v5.12.3", "v5.8.0")
RELEASE_MODULES = ("util", "i18n", "parameterNodeWrapper", "ScriptedLoadableModule", "packaging")


class _ModuleManager:
    def __init__(self, qt, modules):
        class Manager(qt.QObject):
            moduleAboutToBeUnloaded = __import__("pythonqt_emulation").Signal()

        self.qobject = Manager()
        self._modules = modules

    def connect(self, signature, slot):
        self.qobject.connect(signature, slot)

    def disconnect(self, signature, slot):
        self.qobject.disconnect(signature, slot)

    def module(self, name):
        return self._modules.get(name)


@contextlib.contextmanager
def slicer_release(tag: str, tmp_path: Path):
    """Slicer's Python of release ``tag`` over slicer-core's MRML, the PythonQt emulation and a fresh scene."""
    import slicer

    import pythonqt_emulation
    import slicer_standins

    saved_modules = {k: v for k, v in sys.modules.items()
                     if k in ("qt", "ctk", "SACDiff") or k.startswith("slicer.") or k.startswith("SACDiffModuleLib")}
    saved_attrs = {k: slicer.__dict__.get(k, _MISSING) for k in
                   RELEASE_MODULES + ("app", "modules", "mrmlScene", "selfTests", "qMRMLWidget", "qMRMLNodeComboBox",
                                      "qMRMLSliderWidget", "qMRMLRangeWidget", "qMRMLSpinBox", "qSlicerWidget")}
    saved_path = list(slicer.__path__)
    saved_sys_path = list(sys.path)
    try:
        for key in [k for k in sys.modules if k == "SACDiff" or k.startswith("SACDiffModuleLib")]:
            del sys.modules[key]  # imported by other tests against the stand-in ScriptedLoadableModuleLogic
        qt, ctk = pythonqt_emulation.install(slicer)
        qt.QSettings.STORE = {}
        pythonqt_emulation.SLOT_ERRORS.clear()
        for name in RELEASE_MODULES:
            for key in [k for k in sys.modules if k == f"slicer.{name}" or k.startswith(f"slicer.{name}.")]:
                del sys.modules[key]
            slicer.__dict__.pop(name, None)
        slicer.__path__.insert(0, str(SLICER_PYTHON / tag / "slicer"))
        scene = slicer_standins.new_scene()  # real MRML scene + module logics (it also installs a stand-in SLM,
        for name in ("util", "i18n", "parameterNodeWrapper", "ScriptedLoadableModule"):  # replaced here by the real)
            sys.modules.pop(f"slicer.{name}", None)
            setattr(slicer, name, importlib.import_module(f"slicer.{name}"))
        modules = {}
        slicer.app = types.SimpleNamespace(
            temporaryPath=str(tmp_path), testingEnabled=lambda: False, processEvents=lambda *a: None,
            setOverrideCursor=lambda *a: None, restoreOverrideCursor=lambda *a: None,
            translate=lambda context, text: text, layoutManager=lambda: None,
            moduleManager=lambda: manager, applicationLogic=lambda: slicer._standin_keepalive[0])
        manager = _ModuleManager(qt, modules)
        slicer.modules.__dict__["_panel_modules"] = modules
        release = types.SimpleNamespace(qt=qt, ctk=ctk, scene=scene, slicer=slicer, modules=modules, manager=manager,
                                        tag=tag, panels=[])
        try:
            yield release
        finally:  # as Slicer at exit: every panel cleaned up (observers removed) before the scene goes
            for panel in release.panels:
                for widget in panel.widgets:
                    with contextlib.suppress(Exception):
                        widget.exit()
                    with contextlib.suppress(Exception):
                        widget.cleanup()
                    with contextlib.suppress(Exception):
                        widget.removeObservers()
            scene.Clear(1)
    finally:
        for key in [k for k in sys.modules if k in ("qt", "ctk", "SACDiff") or k.startswith("slicer.")
                    or k.startswith("SACDiffModuleLib")]:
            del sys.modules[key]
        sys.modules.update(saved_modules)
        for k, v in saved_attrs.items():
            if v is _MISSING:
                slicer.__dict__.pop(k, None)
            else:
                setattr(slicer, k, v)
        slicer.__path__[:] = saved_path
        sys.path[:] = saved_sys_path


_MISSING = object()


class Panel:
    """The module loaded and its panel shown, as in Slicer; ``dialogs`` records every message box."""

    def __init__(self, release, confirm: bool = True):
        self.release = release
        self.dialogs: list[tuple[str, str]] = []
        self.confirm = confirm
        slicer, qt = release.slicer, release.qt
        util = slicer.util
        util.errorDisplay = lambda text, *a, **k: self.dialogs.append(("error", str(text)))
        util.warningDisplay = lambda text, *a, **k: self.dialogs.append(("warning", str(text)))
        util.infoDisplay = lambda text, *a, **k: self.dialogs.append(("info", str(text)))
        util.confirmOkCancelDisplay = lambda text, *a, **k: self.dialogs.append(("confirm", str(text))) or self.confirm
        util.setSliceViewerLayers = lambda *a, **k: None  # no slice views without the application
        self.load()
        self.widgetParent = slicer.qMRMLWidget()
        self.widgetParent.setLayout(qt.QVBoxLayout())
        self.widgetParent.isEntered = False
        self.widget = self.module.SACDiffWidget(self.widgetParent)
        self.widgets = [self.widget]
        release.panels.append(self)
        self.widget.setup()
        self.enter()

    def load(self):
        """Execute SACDiff.py as module "SACDiff" (its folder on sys.path) and create the module object."""
        folder = ROOT / "SACDiff"
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
        spec = importlib.util.spec_from_file_location("SACDiff", folder / "SACDiff.py")
        self.module = importlib.util.module_from_spec(spec)
        sys.modules["SACDiff"] = self.module
        spec.loader.exec_module(self.module)
        parent = types.SimpleNamespace(path=str(folder / "SACDiff.py"))
        self.moduleObject = self.module.SACDiff(parent)
        self.release.modules["SACDiff"] = parent
        self.release.slicer.modules.__dict__["sacdiff"] = parent

    # --- what Slicer does --------------------------------------------------------------------------------------

    def enter(self):
        self.widget.enter()
        self.widgetParent.isEntered = True

    def exit(self):
        self.widget.exit()
        self.widgetParent.isEntered = False

    def close_scene(self):
        """File → Close Scene: Slicer clears the scene (StartCloseEvent … EndCloseEvent)."""
        self.release.scene.Clear(0)

    def reload(self):
        """Developer mode → Reload: the old widget's cleanup(), the module file executed again, a new panel."""
        self.release.manager.qobject.moduleAboutToBeUnloaded.emit("SACDiff")
        old = self.widget
        self.load()
        self.widget = self.module.SACDiffWidget(self.widgetParent)
        self.widgets.append(self.widget)
        self.widget.setup()
        self.enter()
        return old

    # --- what the user does -------------------------------------------------------------------------------------

    @property
    def ui(self):
        return self.widget.ui

    @property
    def parameters(self):
        return self.widget._parameterNode

    def wait_for_run(self, timeout: float = 300.0):
        """Let the poll timer fire (Qt's event loop) until the run is over and the panel says so."""
        start = time.monotonic()
        while self.widget._timer.isActive():
            self.widget._timer.fire()
            if time.monotonic() - start > timeout:
                raise TimeoutError("the detection did not finish")
            time.sleep(0.05)
