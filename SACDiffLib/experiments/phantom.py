"""Synthetic chest CT with known lesions, for tests and the demo (deterministic per seed).

Anatomy (HU): air outside (−1000), body with a subcutaneous fat layer (−100) and soft tissue (40), spine and ribs
(bone 400–800), heart and mediastinum (40), trachea and main bronchi (air), two lungs (−860 with a faint texture)
that taper towards the apices, a vessel tree branching from each hilum that thins towards the periphery (40),
scanner-like noise (Gaussian, σ 18 HU). Index x grows towards the patient's left (LPS, identity direction), so the
right lung has the smaller x.

Lesions:
- ``covid``: 2–5 large, peripheral, bilateral blobs — ground glass (−650..−450 HU) with consolidated cores
  (−150..0 HU), smooth edges.
- ``ild``: small, subtle, subpleural reticulation in the lower lungs — thin lines of −550 HU in a band along the
  lung border, and a few honeycomb cysts (air with walls).
- ``normal``: none.
The lesion mask marks lung voxels raised by ≥ 100 HU by a lesion.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .. import io
from ..atomic import Output
from ..errors import SACDiffError

KINDS = ("covid", "ild", "normal")
FOV_MM = 360.0


def chest_phantom(size: int = 128, slices: int = 32, kind: str = "covid", seed: int = 0, slice_mm: float = 5.0):
    """(HU int16 (z, y, x), lung labels uint8 (1 right, 2 left), lesion uint8, spacing (x, y, z) in mm)."""
    if kind not in KINDS:
        raise SACDiffError(f"phantom kind {kind!r} unknown; choose one of {', '.join(KINDS)}")
    if not 32 <= size <= 1024 or slices < 4:
        raise SACDiffError(f"phantom size {size}×{size}×{slices}: use 32..1024 pixels and at least 4 slices")
    rng = np.random.default_rng(seed)
    px = FOV_MM / size
    spacing = (px, px, float(slice_mm))
    # Normalised coordinates: x, y in units of the field of view (−0.5..0.5), u = 0 (base) .. 1 (apex).
    c = (np.arange(size) + 0.5) / size - 0.5
    y, x = np.meshgrid(c, c, indexing="ij")
    jitter = lambda s: 1 + rng.uniform(-s, s)  # noqa: E731  per-case anatomical variation
    body_a, body_b = 0.44 * jitter(0.05), 0.31 * jitter(0.05)
    lung_w, lung_h = 0.15 * jitter(0.08), 0.23 * jitter(0.08)
    lung_x = 0.2 * jitter(0.05)

    hu = np.full((slices, size, size), -1000.0, np.float32)
    lungs = np.zeros(hu.shape, np.uint8)
    for z in range(slices):
        u = z / max(slices - 1, 1)
        r_body = (x / body_a) ** 2 + ((y - 0.02) / body_b) ** 2
        sl = hu[z]
        sl[r_body <= 1] = -100.0  # fat
        sl[r_body <= 0.82] = 40.0  # muscle / soft tissue
        # Ribs: bone arcs inside the body wall, interrupted, phase drifting with z.
        theta = np.arctan2(y - 0.02, x)
        ribs = (r_body > 0.68) & (r_body < 0.76) & (np.sin(9 * theta + 2.5 * u * np.pi) > 0.55)
        sl[ribs] = 700.0
        # Lungs: ellipses tapering to the apex, a flat-ish base.
        profile = np.clip(np.sin(np.pi * np.clip((u - 0.08) / 0.9, 0, 1)), 0, 1) ** 0.6
        if profile > 0.05:
            for label, sx in ((1, -1), (2, 1)):
                cx = sx * lung_x
                r = ((x - cx) / (lung_w * profile)) ** 2 + ((y - 0.03) / (lung_h * (0.4 + 0.6 * profile))) ** 2
                lungs[z][(r <= 1) & (r_body <= 0.6)] = label
        # Heart (anterior, towards the patient's left) and mediastinum cut into the lungs.
        if 0.12 < u < 0.55:
            heart = ((x - 0.06) / 0.14) ** 2 + ((y + 0.07) / 0.12) ** 2 <= 1
            lungs[z][heart] = 0
        mediastinum = (np.abs(x) < 0.05) & (y < 0.2)
        lungs[z][mediastinum] = 0
        sl[lungs[z] > 0] = -860.0
        # Spine: vertebral body with a cortical ring, posterior midline.
        rs = x**2 + (y - 0.2) ** 2
        sl[rs <= 0.05**2] = 350.0
        sl[(rs <= 0.05**2) & (rs >= 0.04**2)] = 800.0
        # Airways: trachea above the carina, main bronchi just below.
        if u > 0.7:
            tr = x**2 + (y + 0.02) ** 2
            sl[tr <= 0.028**2] = 40.0
            sl[tr <= 0.022**2] = -1000.0
        elif 0.6 < u <= 0.7:
            for sx in (-1, 1):
                br = (x - sx * 0.06) ** 2 + (y + 0.0) ** 2
                sl[br <= 0.018**2] = 40.0
                sl[br <= 0.013**2] = -1000.0
    inside = lungs > 0
    # Faint parenchymal texture.
    texture = ndimage.gaussian_filter(rng.normal(0, 1, hu.shape).astype(np.float32), (0.5, 2.0, 2.0))
    hu[inside] += 25.0 * texture[inside] / (texture.std() + 1e-6)
    _vessels(hu, inside, rng, spacing)
    lesion = np.zeros(hu.shape, bool)
    if kind == "covid":
        lesion = _covid_lesions(hu, lungs, rng, spacing)
    elif kind == "ild":
        lesion = _ild_lesions(hu, lungs, rng, spacing)
    hu += rng.normal(0, 18.0, hu.shape).astype(np.float32)
    return np.clip(hu, -1024, 3000).astype(np.int16), lungs, lesion.astype(np.uint8), spacing


def _vessels(hu, inside, rng, spacing):
    """Branches from each hilum to random points in the lung, radius shrinking from ~4 mm to ~1 mm."""
    zs, ys, xs = np.nonzero(inside)
    if zs.size == 0:
        return
    shape = np.array(hu.shape)
    sp = np.array([spacing[2], spacing[1], spacing[0]])  # mm per voxel in (z, y, x)
    paint = np.zeros(hu.shape, bool)
    for side in (xs < hu.shape[2] / 2, xs >= hu.shape[2] / 2):
        if not side.any():
            continue
        pts = np.stack([zs[side], ys[side], xs[side]], 1)
        hilum = pts.mean(0)
        hilum[2] = hilum[2] * 0.6 + hu.shape[2] / 2 * 0.4  # medial
        ends = pts[rng.choice(len(pts), size=min(40, len(pts)), replace=False)]
        for end in ends:
            length_mm = np.linalg.norm((end - hilum) * sp)
            n = max(int(length_mm / 2.0), 2)
            for t in np.linspace(0, 1, n):
                p = hilum + t * (end - hilum)
                radius_mm = 4.0 * (1 - t) + 0.8 * t
                r = np.maximum(radius_mm / sp, 0.5)
                lo = np.maximum(np.floor(p - r).astype(int), 0)
                hi = np.minimum(np.ceil(p + r).astype(int) + 1, shape)
                if np.any(hi <= lo):
                    continue
                gz, gy, gx = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
                ball = ((gz - p[0]) / r[0]) ** 2 + ((gy - p[1]) / r[1]) ** 2 + ((gx - p[2]) / r[2]) ** 2 <= 1
                paint[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] |= ball
    hu[paint & inside] = 40.0


def _ellipsoid_field(shape, centre, radii_vox):
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return ((zz - centre[0]) / radii_vox[0]) ** 2 + ((yy - centre[1]) / radii_vox[1]) ** 2 + (
        (xx - centre[2]) / radii_vox[2]
    ) ** 2


def _covid_lesions(hu, lungs, rng, spacing):
    inside = lungs > 0
    before = hu.copy()
    edge = inside & ~ndimage.binary_erosion(inside, structure=np.ones((1, 3, 3), bool), iterations=3)
    sp = np.array([spacing[2], spacing[1], spacing[0]])
    count = int(rng.integers(2, 6))
    for i in range(count):
        label = 1 + (i % 2)  # bilateral
        candidates = np.argwhere(edge & (lungs == label))
        if len(candidates) == 0:
            continue
        centre = candidates[rng.integers(len(candidates))]
        radii_mm = rng.uniform(12, 28, 3)
        f = _ellipsoid_field(hu.shape, centre, radii_mm / sp)
        weight = 1.0 / (1.0 + np.exp(np.minimum((f - 1.0) * 6.0, 50.0)))  # smooth edge
        ggo = rng.uniform(-650, -450)
        target = np.where(f < 0.3, rng.uniform(-150, 0), ggo)
        hu[:] = np.where(inside, hu + weight * np.clip(target - hu, 0, None), hu)
    return inside & (hu - before >= 100)


def _ild_lesions(hu, lungs, rng, spacing):
    inside = lungs > 0
    before = hu.copy()
    z = np.arange(hu.shape[0]) / max(hu.shape[0] - 1, 1)
    lower = (z < 0.55)[:, None, None]
    band_px = max(1, int(round(8.0 / spacing[0])))
    band = inside & ~ndimage.binary_erosion(inside, structure=np.ones((1, 3, 3), bool), iterations=band_px) & lower
    yy, xx = np.mgrid[: hu.shape[1], : hu.shape[2]]
    period = max(3.0, 5.0 / spacing[0])
    phase = rng.uniform(0, 2 * np.pi, 2)
    net = (np.abs(np.sin(xx / period + phase[0])) < 0.25) | (np.abs(np.sin(yy / period + phase[1])) < 0.25)
    blobs = ndimage.gaussian_filter(rng.normal(0, 1, hu.shape), (1, 6, 6))
    patches = blobs > 0.3 * blobs.std()
    reticulation = band & net[None] & patches
    hu[reticulation] = np.maximum(hu[reticulation], -550.0)
    # Honeycomb cysts: small air cysts with a soft-tissue wall in the band.
    candidates = np.argwhere(band & patches)
    for _ in range(min(12, len(candidates))):
        c = candidates[rng.integers(len(candidates))]
        r = max(1.5, 3.0 / spacing[0])
        f = _ellipsoid_field(hu.shape, c, (0.8, r, r))
        wall = (f <= 1.6) & (f > 1.0) & inside
        hu[wall] = np.maximum(hu[wall], -300.0)
        hu[(f <= 1.0) & inside] = -980.0
    return inside & (hu - before >= 100)


def write_phantom_cases(out_dir, cases: int = 3, kind: str = "covid", size: int = 128, slices: int = 32,
                        seed: int = 0, normals: int = 0, overwrite: bool = False) -> Path:
    """A folder in the layout of ``../shared/data``: ``cases.json`` + ``ct/<case>_{ct,lung,lesion}.nii.gz``.
    ``normals`` extra healthy cases are added (diagnosis ``normal``)."""
    out_dir = Path(out_dir)
    for name, value, lo, hi in (("--cases", cases, 0, 1000), ("--normals", normals, 0, 1000), ("--size", size, 32, 1024),
                                ("--slices", slices, 4, 2000), ("--seed", seed, 0, 2**31)):
        if not lo <= value <= hi:
            raise SACDiffError(f"phantom {name} = {value} is out of range: it must be in {lo}..{hi}")
    if cases + normals < 1:
        raise SACDiffError("phantom needs at least one case: --cases and --normals are both 0")
    with Output(out_dir, "results", overwrite) as tmp:
        _write_cases(tmp, cases, kind, size, slices, seed, normals)
    return out_dir


def _write_cases(out_dir: Path, cases: int, kind: str, size: int, slices: int, seed: int, normals: int) -> None:
    (out_dir / "ct").mkdir()
    index = {}
    plan = [(f"phantom_{kind}_{i:03d}", kind, seed * 1000 + i) for i in range(cases)]
    plan += [(f"phantom_normal_{i:03d}", "normal", seed * 1000 + 500 + i) for i in range(normals)]
    for name, k, s in plan:
        hu, lungs, lesion, spacing = chest_phantom(size, slices, k, s)
        ref = sitk.GetImageFromArray(hu)
        ref.SetSpacing(spacing)
        ref.SetOrigin((-FOV_MM / 2, -FOV_MM / 2, 0.0))
        for suffix, array in (("ct", hu), ("lung", lungs), ("lesion", lesion)):
            if suffix == "lesion" and k == "normal":
                continue
            io.write_image(array, ref, out_dir / "ct" / f"{name}_{suffix}.nii.gz")
        entry = {"source": f"SACDiff phantom (seed {s})", "diagnosis": {"covid": "covid19"}.get(k, k),
                 "size_xyz": [size, size, slices], "spacing_xyz_mm": list(spacing)}
        if k != "normal":
            entry["slice_label_infection"] = lesion.reshape(slices, -1).any(1).astype(int).tolist()
        index[name] = entry
    (out_dir / "cases.json").write_text(json.dumps(index, indent=1), encoding="utf-8")
