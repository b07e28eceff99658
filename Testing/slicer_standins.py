"""STAND-INS, not Slicer code: the few pieces of the Slicer application that the ``slicer-core`` wheel lacks.

``slicer-core`` gives the real MRML scene, nodes, storage nodes, module logics and Slicer's own ``slicer/util.py``
but no application: no ``slicer.mrmlScene``, no ``slicer.modules`` and no ``slicer.ScriptedLoadableModule``.
``new_scene()`` builds what Slicer's application does at start-up — a scene with the application logic and the
Segmentations / Subject hierarchy / Volumes / Colors module logics bound to it (without the binding, segment
creation fails with only a VTK log line) — and installs a one-class stand-in for ``ScriptedLoadableModuleLogic``.
"""

from __future__ import annotations

import sys
import types

import slicer

try:  # VTK logs to stderr; keep test output readable
    from vtkmodules.vtkCommonCore import vtkLogger

    vtkLogger.SetStderrVerbosity(vtkLogger.VERBOSITY_ERROR)
except ImportError:  # pragma: no cover
    pass


class ScriptedLoadableModuleLogicStandIn:
    """Stand-in for slicer.ScriptedLoadableModule.ScriptedLoadableModuleLogic (only its constructor is used)."""

    def __init__(self, parent=None):
        self.parent = parent


def _module_namespace(logic):
    return types.SimpleNamespace(logic=lambda: logic)


def new_scene():
    """A fresh real MRML scene, bound to the module logics, installed as ``slicer.mrmlScene``."""
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    logics = {}
    for name, cls in (("colors", slicer.vtkSlicerColorLogic), ("subjecthierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic),
                      ("segmentations", slicer.vtkSlicerSegmentationsModuleLogic), ("volumes", slicer.vtkSlicerVolumesLogic)):
        logic = cls()
        logic.SetMRMLApplicationLogic(app)
        logic.SetMRMLScene(scene)
        logics[name] = logic
    app.SetModuleLogic("Colors", logics["colors"])
    slicer.mrmlScene = scene
    slicer.modules = types.SimpleNamespace(**{k: _module_namespace(v) for k, v in logics.items()})
    slicer._standin_keepalive = (app, logics)  # keep the VTK objects alive as long as the scene
    stand_in = types.ModuleType("slicer.ScriptedLoadableModule")
    stand_in.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogicStandIn
    sys.modules["slicer.ScriptedLoadableModule"] = stand_in
    slicer.ScriptedLoadableModule = stand_in
    return scene
