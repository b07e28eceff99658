"""Classical lung mask for when the user has none, and the right/left split used for per-lung volumes.

Labels follow one convention throughout SACDiff: 1 = right lung, 2 = left lung (patient sides; in the LPS
physical frame of ITK the right lung lies at smaller x).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .errors import SACDiffError

RIGHT, LEFT = 1, 2
LUNG_METHODS = ("classical", "learned")


@dataclass(frozen=True)
class LungSource:
    """Where a detection's lung mask comes from when the user gives none (``method``: this file's threshold
    fallback or the learned network of ``lungnet.py``, from ``model`` or the shipped one), and whether a given
    mask is completed with the learned mask's pathology-inclusive parts (``complete``; never on by default: a
    mask drawn by hand stays exactly as drawn)."""

    method: str = "classical"
    model: Optional[str] = None
    complete: bool = False

    def __post_init__(self):
        if self.method not in LUNG_METHODS:
            raise SACDiffError(f"lung method {self.method!r} unknown; choose one of {', '.join(LUNG_METHODS)}")
AIR_HU = -320.0  # lung parenchyma and air lie below this; soft tissue above
TRACHEA_AREA_MM2 = (50.0, 900.0)  # cross-section of the trachea (≈ 8–30 mm across)


def segment_lungs(hu: np.ndarray, image: sitk.Image, cropped: bool = False, airways: bool = False) -> np.ndarray:
    """Lungs of a chest CT (z, y, x) in HU → uint8 labels (1 right, 2 left); without the trachea and main bronchi
    unless ``airways`` (``exclude_airways``).

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
    if not airways:
        lungs &= ~airway_tree(hu, lungs, image)
    return split_left_right(lungs, image)


def body_mask(hu: np.ndarray) -> np.ndarray:
    """The patient's body (z, y, x) → bool: the largest connected component above −320 HU, holes filled slice by
    slice (so the lungs and airways count as body). The table and the air around the patient are not body."""
    dense = hu > AIR_HU
    labels, n = ndimage.label(dense)
    if n == 0:
        return dense
    sizes = ndimage.sum_labels(dense, labels, index=np.arange(1, n + 1))
    body = labels == int(np.argmax(sizes)) + 1
    for z in range(body.shape[0]):
        body[z] = ndimage.binary_fill_holes(body[z])
    return body


def exclude_airways(hu: np.ndarray, lung: np.ndarray, image: sitk.Image) -> np.ndarray:
    """A lung label image (any source, e.g. the user's) without the trachea and main bronchi; labels kept."""
    return np.where(airway_tree(hu, lung > 0, image), 0, lung).astype(lung.dtype)


def airway_tree(hu: np.ndarray, lung: np.ndarray, image: sitk.Image) -> np.ndarray:
    """Trachea and main bronchi inside ``lung``: the parts of the airway that run outside the lung parenchyma.

    Seed: scanning down from the most cranial lung slice (the trachea runs above the apices), the first component
    of the slice's mask that is trachea-like: 50–900 mm², round (≥ 50 % of its bounding box), air (median
    < −700 HU) and in the middle third of the body's width. Then slice by slice caudally, the mask components that
    overlap the previous slice's airway (dilated by 2 pixels) and are still airway-sized (≤ 900 mm²) are airway;
    a bronchus ends where it merges into the lung field. Empty when no trachea is seen (a scan that starts below
    the carina, a single slice)."""
    airway = np.zeros(lung.shape, bool)
    if lung.ndim != 3 or lung.shape[0] < 3 or not lung.any():
        return airway
    sx, sy, _ = image.GetSpacing()
    min_px, max_px = (a / (sx * sy) for a in TRACHEA_AREA_MM2)
    z_phys = [image.TransformContinuousIndexToPhysicalPoint((0.0, 0.0, float(z)))[2] for z in (0, lung.shape[0] - 1)]
    order = list(range(lung.shape[0]) if z_phys[0] > z_phys[1] else range(lung.shape[0] - 1, -1, -1))  # cranial 1st
    lung_z = [z for z in order if lung[z].any()]
    start = None
    for z in lung_z[: max(3, len(lung_z) // 3)]:
        body = np.nonzero((hu[z] > AIR_HU).any(axis=0))[0]
        if body.size == 0:
            continue
        x_lo, x_hi = body[0] + (body[-1] - body[0]) / 3, body[-1] - (body[-1] - body[0]) / 3
        labels, _ = ndimage.label(lung[z])
        for i, sl in enumerate(ndimage.find_objects(labels), start=1):
            component = labels[sl] == i
            cx = (sl[1].start + sl[1].stop - 1) / 2
            if (min_px <= component.sum() <= max_px and x_lo <= cx <= x_hi and component.mean() >= 0.5
                    and np.median(hu[z][sl][component]) < -700):
                start = z
                airway[z][sl] = component
                break
        if start is not None:
            break
    if start is None:
        return airway
    # Track caudally. Where the airway is still its own component of the mask it is taken whole; where the mask's
    # smoothing has joined it to a lung, only its lumen is taken: pixels darker than the midpoint between the
    # trachea's air core and the lung's median HU, near the airway of the slice above.
    lumen_hu = (np.percentile(hu[airway], 10) + np.median(hu[lung])) / 2
    near = max(1, int(round(3.0 / min(sx, sy))))
    previous = airway[start]
    for z in order[order.index(start) + 1:]:
        labels, _ = ndimage.label(lung[z])
        reach = ndimage.binary_dilation(previous, iterations=near)
        touching = np.unique(labels[reach & (labels > 0)])
        if touching.size == 0:
            break
        sizes = ndimage.sum_labels(lung[z], labels, index=touching)
        current = np.isin(labels, touching[sizes <= max_px])
        joined = np.isin(labels, touching[sizes > max_px])
        lumen, _ = ndimage.label(joined & (hu[z] < lumen_hu))
        hit = np.unique(lumen[previous & (lumen > 0)])
        current |= np.isin(lumen, hit[hit > 0])
        if not current.any() or current.sum() > max_px:
            break
        airway[z] = current
        previous = current
    ring = ndimage.generate_binary_structure(3, 1)
    ring[0] = ring[2] = False  # in-plane only
    wall = max(1, int(round(2.0 / min(sx, sy))))  # ≈ 2 mm: the airway wall and the lumen's partial-volume rim
    return ndimage.binary_dilation(airway, structure=ring, iterations=wall) & lung


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


ONE_LUNG_FRACTION = 0.1  # a one-field mask with less than this on one side of the body's midline is one lung


def lung_labels(mask: np.ndarray, image: sitk.Image, body: Optional[np.ndarray] = None) -> tuple[np.ndarray, str]:
    """(right/left labels, how they were read) for a given lung mask.

    Labels 1 and 2 both present: right and left as given; only label 2: the left lung as given. Otherwise the mask
    is unlabeled (binary 0/1 as most tools write, or any other values) and is split (``split_left_right``) — except a
    single connected field lying on one side of the body's midline (``body``: ``body_mask``; ≥ 1 − ONE_LUNG_FRACTION
    of it on one side): that is one lung (e.g. after a pneumonectomy, or a one-lung mask labelled 1), labelled by the
    side it lies on, never cut in two."""
    values = set(np.unique(mask).tolist()) - {0}
    if values == {RIGHT, LEFT}:
        return mask.astype(np.uint8), "labels 1/2 read as right/left"
    if values == {LEFT}:
        return mask.astype(np.uint8), "label 2 only: the left lung as given"
    field = mask > 0
    labels, n = ndimage.label(field)
    if body is not None and body.any() and n >= 1:
        sizes = np.bincount(labels.ravel())[1:]
        if sizes.max() >= 0.9 * field.sum():  # one connected field (small pieces aside)
            midline = _physical_x(np.argwhere(body).mean(axis=0), image)
            right_share = float((_side_by_x(np.argwhere(field), image, midline) == RIGHT).mean())
            if min(right_share, 1 - right_share) < ONE_LUNG_FRACTION:
                side = RIGHT if right_share >= 0.5 else LEFT
                out = np.zeros(mask.shape, np.uint8)
                out[field] = side
                return out, f"one lung ({'right' if side == RIGHT else 'left'}, by its side of the body)"
    return split_left_right(field, image), "unlabeled mask split into right/left"
