"""Offscreen slice views drawn by Slicer's OWN rendering code (``slicer-core``), for tests and screenshots.

What Slicer's slice widget does, minus Qt: a ``vtkMRMLSliceLogic`` per view reslices and blends the composite
node's background/foreground volumes; the segmentations 2D displayable manager (registered with the slice-view
factory) draws segment fill and outline; the slice logic's blended image is shown through a ``vtkImageMapper`` on a
2D actor, rendered offscreen (EGL when there is no display) and read back as an RGB array.
Needs the scene of ``slicer_standins.new_scene()`` (the application logic is in ``slicer._standin_keepalive``).
"""

from __future__ import annotations

import numpy as np
import slicer
import vtk
from vtk.util.numpy_support import numpy_to_vtk, vtk_to_numpy

LAYOUTS = {"Axial": "Red", "Sagittal": "Yellow", "Coronal": "Green"}
_registered = []
_views = []  # every view's layout name is its own (two slice logics of one name would share one slice node)


def _application_logic():
    return slicer._standin_keepalive[0]


def _factory():
    factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
    if not _registered:
        factory.SetMRMLApplicationLogic(_application_logic())
        factory.RegisterDisplayableManager("vtkMRMLSegmentationsDisplayableManager2D")
        _registered.append(True)
    return factory


class SliceView:
    """One slice view (Axial / Sagittal / Coronal) of ``size`` pixels."""

    def __init__(self, orientation: str = "Axial", size: tuple[int, int] = (320, 320)):
        app = _application_logic()
        if app.GetSliceLogics() is None:
            app.SetSliceLogics(vtk.vtkCollection())
        self.width, self.height = size
        self.logic = slicer.vtkMRMLSliceLogic()
        self.logic.SetMRMLApplicationLogic(app)
        self.logic.SetMRMLScene(slicer.mrmlScene)
        _views.append(orientation)
        self.node = self.logic.AddSliceNode(f"{LAYOUTS[orientation]}{len(_views)}")
        app.GetSliceLogics().AddItem(self.logic)
        self.node.SetOrientation(orientation)
        self.node.SetDimensions(self.width, self.height, 1)
        self.window = vtk.vtkRenderWindow()
        self.window.SetOffScreenRendering(1)
        self.window.SetSize(self.width, self.height)
        self.renderer = vtk.vtkRenderer()
        self.window.AddRenderer(self.renderer)
        self.interactor = vtk.vtkRenderWindowInteractor()  # displayable managers need one (no event loop runs)
        self.interactor.SetRenderWindow(self.window)
        self.mapper = vtk.vtkImageMapper()
        self.mapper.SetColorWindow(255)
        self.mapper.SetColorLevel(127.5)
        actor = vtk.vtkActor2D()
        actor.SetMapper(self.mapper)
        self.renderer.AddViewProp(actor)
        self.managers = _factory().InstantiateDisplayableManagers(self.renderer)
        self.managers.SetMRMLDisplayableNode(self.node)

    def show(self, background, foreground=None, opacity: float = 0.0):
        composite = self.logic.GetSliceCompositeNode()
        composite.SetBackgroundVolumeID(background.GetID())
        composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
        composite.SetForegroundOpacity(opacity)
        self.logic.FitSliceToBackground(self.width, self.height)
        self.node.UpdateMatrices()

    def jump_to(self, ras) -> None:
        """Put the slice through the RAS point (mm)."""
        self.node.JumpSliceByOffsetting(*[float(v) for v in ras])

    def render(self) -> np.ndarray:
        """(height, width, 3) uint8, row 0 at the bottom (the slice node's XY frame)."""
        self.mapper.SetInputConnection(self.logic.GetImageDataConnection())  # (the logic's pipeline is rebuilt per layer)
        self.window.Render()
        grab = vtk.vtkWindowToImageFilter()
        grab.SetInput(self.window)
        grab.Update()
        image = grab.GetOutput()
        pixels = vtk_to_numpy(image.GetPointData().GetScalars())
        return pixels.reshape(self.height, self.width, -1)[..., :3].copy()

    def voxel_of_pixels(self, volume) -> np.ndarray:
        """(height, width, 3) IJK index (k, j, i order, i.e. numpy's z, y, x) of ``volume`` under every pixel centre."""
        xy_to_ras = np.array([[self.node.GetXYToRAS().GetElement(r, c) for c in range(4)] for r in range(4)])
        ras_to_ijk = vtk.vtkMatrix4x4()
        volume.GetRASToIJKMatrix(ras_to_ijk)
        ras_to_ijk = np.array([[ras_to_ijk.GetElement(r, c) for c in range(4)] for r in range(4)])
        yy, xx = np.mgrid[: self.height, : self.width]
        xy = np.stack([xx + 0.5, yy + 0.5, np.zeros_like(xx), np.ones_like(xx)], axis=-1).astype(float)
        ijk = xy @ (ras_to_ijk @ xy_to_ras).T
        return np.rint(ijk[..., 2::-1]).astype(int)  # (k, j, i)


def sample(array: np.ndarray, kji: np.ndarray, outside=0) -> np.ndarray:
    """array[k, j, i] under every pixel, ``outside`` where the pixel falls outside the array."""
    inside = np.all((kji >= 0) & (kji < np.array(array.shape)), axis=-1)
    out = np.full(kji.shape[:-1], outside, dtype=array.dtype)
    k, j, i = (kji[inside][:, n] for n in range(3))
    out[inside] = array[k, j, i]
    return out


def write_png(rgb: np.ndarray, path) -> None:
    """Save a render (row 0 at the bottom) as a PNG the right way up."""
    image = vtk.vtkImageData()
    image.SetDimensions(rgb.shape[1], rgb.shape[0], 1)
    image.GetPointData().SetScalars(numpy_to_vtk(np.ascontiguousarray(rgb).reshape(-1, 3), deep=True))
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(path))
    writer.SetInputData(image)
    writer.Write()
