"""Classical lung mask for when the user has none, and the right/left split used for per-lung volumes.

Labels follow one convention throughout SACDiff: 1 = right lung, 2 = left lung (patient sides; in the LPS
physical frame of ITK the right lung lies at smaller x).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .errors import SACDiffError

RIGHT, LEFT = 1, 2
AIR_HU = -320.0  # lung parenchyma and air lie below this; soft tissue above


def segment_lungs(hu: np.ndarray, image: sitk.Image, cropped: bool = False) -> np.ndarray:
    """Lungs of a chest CT (z, y, x) in HU → uint8 labels (1 right, 2 left).

    Threshold at −320 HU, drop the air outside the body (components touching the in-plane border; with ``cropped``,
    only components with a long border contact, for images cropped to the chest), keep the largest
    one or two air components (two when the second is at least 10 % of the first), fill holes slice by slice
    (vessels, nodules, consolidation surrounded by lung), smooth with a small closing, then split right/left.
    """
    if hu.ndim != 3:
        raise SACDiffError("lung segmentation needs a 3D CT")
    air = hu < AIR_HU
    labels, n = ndimage.label(air)
    if n == 0:
        raise SACDiffError("no air-density voxels (< −320 HU) found: this does not look like a chest CT")
    border = np.zeros_like(air)
    border[:, [0, -1], :] = True
    border[:, :, [0, -1]] = True
    if cropped:
        # Images cropped to the chest (e.g. MedSeg slices): a lung may graze the border. Only components with a
        # long border contact (> 10 % of the border pixels of the slices they touch) are outside air.
        contact = ndimage.sum_labels(border & air, labels, index=np.arange(1, n + 1))
        perimeter = 2 * (air.shape[1] + air.shape[2]) * air.shape[0]
        outside = np.nonzero(contact > 0.1 * perimeter)[0] + 1
    else:
        outside = np.unique(labels[border & air])
    sizes = ndimage.sum_labels(air, labels, index=np.arange(1, n + 1))
    sizes[outside[outside > 0] - 1] = 0
    order = np.argsort(sizes)[::-1]
    if sizes[order[0]] == 0:
        raise SACDiffError("all air in this CT touches the image border; cannot find the lungs (give a lung mask)")
    keep = [order[0] + 1]
    if n > 1 and sizes[order[1]] >= 0.1 * sizes[order[0]]:
        keep.append(order[1] + 1)
    lungs = np.isin(labels, keep)
    lungs = ndimage.binary_closing(lungs, structure=np.ones((1, 3, 3), bool), iterations=2)
    for z in range(lungs.shape[0]):
        lungs[z] = ndimage.binary_fill_holes(lungs[z])
    return split_left_right(lungs, image)


def split_left_right(mask: np.ndarray, image: sitk.Image) -> np.ndarray:
    """Binary lung mask → labels 1 (right) / 2 (left).

    Two large components (the second ≥ 10 % of the first) are assigned by their centroid's physical x; a single
    connected lung field is cut at the physical x of its centroid.
    """
    mask = mask > 0
    out = np.zeros(mask.shape, np.uint8)
    if not mask.any():
        return out
    labels, n = ndimage.label(mask)
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
    order = np.argsort(sizes)[::-1] + 1
    if n >= 2 and sizes[order[1] - 1] >= 0.1 * sizes[order[0] - 1]:
        xs = [_physical_x(np.argwhere(labels == lab).mean(axis=0), image) for lab in order[:2]]
        right, left = (order[0], order[1]) if xs[0] < xs[1] else (order[1], order[0])
        out[labels == right] = RIGHT
        out[labels == left] = LEFT
        # Smaller pieces (e.g. split-off lobes) go to the side of the nearer main component.
        rest = mask & (out == 0)
        if rest.any():
            cut = (xs[0] + xs[1]) / 2
            out[rest] = _side_by_x(np.argwhere(rest), image, cut)
        return out
    cut = _physical_x(np.argwhere(mask).mean(axis=0), image)
    out[mask] = _side_by_x(np.argwhere(mask), image, cut)
    return out


def _physical_x(index_zyx: np.ndarray, image: sitk.Image) -> float:
    z, y, x = (float(v) for v in index_zyx)
    return image.TransformContinuousIndexToPhysicalPoint((x, y, z))[0]


def _side_by_x(indices_zyx: np.ndarray, image: sitk.Image, cut: float) -> np.ndarray:
    """RIGHT where the voxel's physical x is below ``cut`` (LPS), else LEFT."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing = np.array(image.GetSpacing())
    origin = np.array(image.GetOrigin())
    ijk = indices_zyx[:, ::-1].astype(np.float64)  # (x, y, z) index order
    physical_x = origin[0] + (direction @ (ijk * spacing).T)[0]
    return np.where(physical_x < cut, RIGHT, LEFT).astype(np.uint8)


def lung_labels(mask: np.ndarray, image: sitk.Image) -> np.ndarray:
    """Right/left labels for any lung mask: kept when it already uses 1/2, otherwise split."""
    values = set(np.unique(mask).tolist()) - {0}
    if values == {RIGHT, LEFT}:
        return mask.astype(np.uint8)
    return split_left_right(mask > 0, image)
