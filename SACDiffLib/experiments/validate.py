"""``sacdiff validate``: choose a model and its detection settings without any lesion label.

The data are the healthy slices that training kept out (``train.holdout_split``: slabs of the normal cases; the
checkpoint's ``train.holdout_every``, or ``--holdout-every`` for a model trained on everything). Every case's
held-out slices are stacked into one sub-volume (its own spacing and lung mask). Its slabs alternate between clean
and lesion slabs (a lesion never lies in a clean slice's neighbour, so a model that sees neighbouring slices cannot
copy it into the clean ones; a 2.5D model's slabs come with the real slices its neighbours reach, unscored:
``with_context``). In a lesion slab, **synthetic lesions** are drawn, known voxel by voxel:
``synthetic_lesions`` on every second slice (ground-glass patches, consolidations and small nodules blended into
the real lung), and ``solid_nodules_3d`` through the slab (5–30 mm solid spheres at 0…+60 HU, averaged over each
slice's thickness, a third of them touching a vessel and a third the pleura — the nodules real scans show, that a
2D model can reconstruct like a vessel seen end-on; capped by the slab's thickness) and one ``solid_mass``
(15–30 mm, drawn on through the unscored context slices of a 2.5D model, so the mass continues into its neighbours
as a real one does; from its own random stream, so every other lesion is that of earlier validations). One
detection per setting then gives, label-free:

- ``healthy_flagged_percent`` at each λ: % of the lung flagged on the slices left clean — the false-positive
  burden that the default λ must keep ≤ 1 %;
- ``vessel_flagged_percent`` at each λ: % of the clean lung's voxels above −300 HU (vessels, fissures, bronchial
  walls) that are flagged — the false positives a deep or harmonised chain can bring;
- per case, ``worst_clean_slice_ml`` at each λ: the largest volume flagged on any one clean slice (ml) — what a
  slice-level ranking sees: a false positive that is small over the whole lung but piles up on a few slices (the
  hilar soft tissue of ctmd_P001, map-candidates.md round 25) ranks those slices above faintly diseased ones;
- ``healthy_error``: mean E inside the clean lung (how sharply healthy lung is reconstructed);
- on the slices with synthetic lesions: voxel AUROC of E, oracle Dice (best single threshold) and the Dice of the
  full pipeline at each λ.

The recommended λ is the smallest of the grid that flags ≤ 1 % of clean lung **on every case** (round 10 of
``Resources/results/map-candidates.md``; a pooled figure let one scan flag 1.7 %). Between settings
(``best_setting``), the one whose map separates its **worst** lesion kind best (the lowest per-kind oracle Dice,
highest) wins, ties (within 0.01) broken by the full pipeline's synthetic Dice at the recommended λ: a setting must
find nodules as well as ground glass (pooled figures are dominated by the large ground-glass patches, and a shallow
T_s that reconstructs solid nodules away still wins them). Per case, the % of clean lung flagged and α at the
recommended λ show how stable the threshold is from scan to scan. Real lesion masks are never read.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .. import io
from ..config import derive
from ..errors import SACDiffError
from ..detect import detect_volume
from ..postprocess import rethreshold
from ..progress import log
from ..metrics import auroc, oracle_dice, segmentation_metrics
from ..data import case_path, healthy_cases, holdout_split, load_cases

LAMBDAS = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0)
FLAGGED_TARGET_PERCENT = 1.0
# (kind, target HU, radius range mm, blend weight): blended towards the target so vessels show through ground glass
LESION_KINDS = (("ground-glass", -450.0, (8.0, 25.0), 0.75), ("consolidation", 20.0, (8.0, 20.0), 0.95),
                ("nodule", 30.0, (3.0, 8.0), 1.0))
SOLID_3D = "solid-3d"  # the kind of ``solid_nodules_3d`` (kinds map value len(LESION_KINDS) + 1)
MASS = "mass"  # the kind of ``solid_mass`` (kinds map value len(LESION_KINDS) + 2)
KIND_NAMES = tuple(k[0] for k in LESION_KINDS) + (SOLID_3D, MASS)
VESSEL_HU = -300.0  # clean-lung voxels above this are vessels, fissures, bronchial walls (the vessel FP figure)
SOLID_DIAMETER_MM = (5.0, 30.0)
SOLID_HU = (0.0, 60.0)
MASS_DIAMETER_MM = (15.0, 30.0)  # masses: beyond a held-out slab's thickness, drawn into its context slices too
PLACEMENTS = ("free", "vessel", "pleura")


def synthetic_lesions(hu: np.ndarray, lung: np.ndarray, spacing_xy, rng: np.random.Generator, count: int = 3,
                      with_kinds: bool = False):
    """(HU slice with lesions, lesion mask) for one axial slice: ``count`` blobs of the LESION_KINDS, each an
    irregular ellipse (smoothed noise-thresholded disc) centred in the eroded lung, clipped to the lung. With
    ``with_kinds`` also a map of which kind each lesion pixel is (1 + index in LESION_KINDS; the last drawn wins)."""
    out, truth = hu.astype(np.float32).copy(), np.zeros(hu.shape, bool)
    kinds = np.zeros(hu.shape, np.uint8)
    inner = ndimage.binary_erosion(lung, iterations=3)
    if not inner.any():
        return (out.astype(hu.dtype), truth, kinds) if with_kinds else (out.astype(hu.dtype), truth)
    yy, xx = np.mgrid[: hu.shape[0], : hu.shape[1]]
    for _ in range(count):
        index = int(rng.integers(len(LESION_KINDS)))
        kind, target, (r_lo, r_hi), blend = LESION_KINDS[index]
        cy, cx = np.argwhere(inner)[rng.integers(int(inner.sum()))]
        ry, rx = rng.uniform(r_lo, r_hi, 2) / np.asarray(spacing_xy[::-1])  # pixels
        angle = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = (dx * np.cos(angle) + dy * np.sin(angle)) / rx
        v = (-dx * np.sin(angle) + dy * np.cos(angle)) / ry
        rough = ndimage.gaussian_filter(rng.normal(size=hu.shape), max(1.0, min(rx, ry) / 3))
        rough /= rough.std() + 1e-6
        shape = (u * u + v * v) < 1 + 0.25 * rough
        weight = ndimage.gaussian_filter(shape.astype(np.float32), 1.0) * blend * lung
        out += weight * (target - out)
        drawn = (weight > 0.5 * blend) & lung
        truth |= drawn
        kinds[drawn] = index + 1
    out = np.round(out).astype(hu.dtype)
    return (out, truth, kinds) if with_kinds else (out, truth)


def _placement_distances(hu_mid: np.ndarray, lung_mid: np.ndarray, spacing_yx, avoid=None):
    """(mm to the lung's edge, mm to the nearest vessel, mm to ``avoid``) on one slice: the maps a placement in
    PLACEMENTS is chosen from. Vessels: lung pixels above VESSEL_HU; ``avoid``: pixels a new lesion must stay off."""
    to_pleura = ndimage.distance_transform_edt(lung_mid, sampling=spacing_yx)
    vessels = lung_mid & (hu_mid > VESSEL_HU)
    far = np.full(lung_mid.shape, np.inf)
    to_vessel = ndimage.distance_transform_edt(~vessels, sampling=spacing_yx) if vessels.any() else far
    to_avoid = ndimage.distance_transform_edt(~avoid, sampling=spacing_yx) if avoid is not None and avoid.any() else far
    return to_pleura, to_vessel, to_avoid


def _sphere_centre(placement: str, r: float, distances, tol: float, rng: np.random.Generator):
    """(y, x) pixel of a sphere of radius ``r`` mm placed ``free`` (≥ r from pleura and vessels), touching a vessel
    (centre r from the nearest vessel pixel) or the pleura (r from the lung's edge), off ``avoid``; None when no
    pixel fits."""
    to_pleura, to_vessel, to_avoid = distances
    if placement == "free":
        ok = (to_pleura > r + tol) & (to_vessel > r + tol)
    elif placement == "vessel":
        ok = (np.abs(to_vessel - r) <= tol) & (to_pleura > r + tol)
    else:
        ok = (np.abs(to_pleura - r) <= tol) & (to_vessel > r)
    candidates = np.argwhere(ok & (to_avoid > r + tol))
    return None if candidates.size == 0 else candidates[rng.integers(len(candidates))]


def _sphere_fraction(shape, spacing_xyz, cz_mm: float, centre_yx, r: float) -> np.ndarray:
    """Per voxel of a (z, y, x) block, the fraction of its slice's thickness that lies inside the sphere of radius
    ``r`` mm centred ``cz_mm`` along z and on pixel ``centre_yx`` (5 samples along z: the partial volume of a thick
    slice), blurred in-plane by 0.5 pixel."""
    sx, sy, sz = (float(v) for v in spacing_xyz)
    cy, cx = centre_yx
    z_mm = (np.arange(shape[0])[:, None] + (np.arange(5) - 2) / 5.0) * sz
    yy, xx = np.mgrid[: shape[1], : shape[2]]
    dz2 = ((z_mm - cz_mm) ** 2)[:, :, None, None]  # (z, 5, 1, 1)
    d2 = ((yy - cy) * sy) ** 2 + ((xx - cx) * sx) ** 2
    return ndimage.gaussian_filter((dz2 + d2[None, None] < r * r).mean(1), (0, 0.5, 0.5))


def _draw_sphere(out: np.ndarray, truth: np.ndarray, lung: np.ndarray, spacing_xyz, mid: int, centre_yx, r: float,
                 rng: np.random.Generator, placement: str) -> dict:
    """Blend one solid sphere (radius ``r`` mm, centred on pixel ``centre_yx`` within half a slice of slice ``mid``,
    at a SOLID_HU drawn from ``rng``) into the float block ``out`` and its ``truth`` (lung voxels more than half
    inside), in place, confined to the lung; returns the placement record."""
    cz = (mid + rng.uniform(-0.5, 0.5)) * float(spacing_xyz[2])
    inside = _sphere_fraction(out.shape, spacing_xyz, cz, centre_yx, r) * lung
    target = rng.uniform(*SOLID_HU)
    out += inside * (target - out)
    truth |= (inside > 0.5) & lung
    return {"placement": placement, "diameter_mm": round(2 * r, 1), "hu": round(target, 1)}


def solid_nodules_3d(hu: np.ndarray, lung: np.ndarray, spacing_xyz, rng: np.random.Generator, count: int = 3):
    """(HU slab with nodules, truth mask, placements) for one slab (z, y, x): ``count`` solid spheres of
    SOLID_DIAMETER_MM (capped by the slab's thickness less one slice) at SOLID_HU, centred on the slab's middle
    slice. Placement cycles through PLACEMENTS (``_sphere_centre``) on the middle slice. Each slice receives the
    fraction of its thickness that lies inside the sphere (``_sphere_fraction``); the lesion is confined to the
    lung. Truth: lung voxels more than half inside. An empty list of placements when no centre fits."""
    out = hu.astype(np.float32).copy()
    truth = np.zeros(hu.shape, bool)
    sx, sy, sz = (float(v) for v in spacing_xyz)
    mid = hu.shape[0] // 2
    if lung[mid].sum() < 50:
        return hu.copy(), truth, []
    distances = _placement_distances(hu[mid], lung[mid], (sy, sx))
    placed = []
    d_hi = min(SOLID_DIAMETER_MM[1], (hu.shape[0] - 1) * sz)
    for i in range(count):
        placement = PLACEMENTS[i % len(PLACEMENTS)]
        r = rng.uniform(SOLID_DIAMETER_MM[0], max(SOLID_DIAMETER_MM[0], d_hi)) / 2
        centre = _sphere_centre(placement, r, distances, max(sx, sy), rng)
        if centre is not None:
            placed.append(_draw_sphere(out, truth, lung, spacing_xyz, mid, centre, r, rng, placement))
    return np.round(out).astype(hu.dtype), truth, placed


def solid_mass(hu: np.ndarray, lung: np.ndarray, spacing_xyz, rng: np.random.Generator, mid: int, placement: str,
               avoid: Optional[np.ndarray] = None):
    """(HU block with a mass, truth mask, placement or None) for one block (z, y, x): a solid sphere of
    MASS_DIAMETER_MM at SOLID_HU centred on slice ``mid`` at ``placement`` (``_sphere_centre``), off the pixels
    ``avoid`` of that slice, rendered through the whole block with the partial volume of ``solid_nodules_3d``.
    The block may reach past a held-out slab into the slices a 2.5D model sees, so the mass continues there."""
    out = hu.astype(np.float32).copy()
    truth = np.zeros(hu.shape, bool)
    sx, sy = (float(v) for v in spacing_xyz[:2])
    if lung[mid].sum() < 50:
        return hu.copy(), truth, None
    r = rng.uniform(*MASS_DIAMETER_MM) / 2
    centre = _sphere_centre(placement, r, _placement_distances(hu[mid], lung[mid], (sy, sx), avoid), max(sx, sy), rng)
    if centre is None:
        return hu.copy(), truth, None
    placed = _draw_sphere(out, truth, lung, spacing_xyz, mid, centre, r, rng, placement)
    return np.round(out).astype(hu.dtype), truth, placed


def _slabs(z: np.ndarray) -> np.ndarray:
    """Slab number of each held-out slice: runs of consecutive slice indices (at most HOLDOUT_SLAB long)."""
    from ..data import HOLDOUT_SLAB

    starts = np.r_[True, np.diff(z) != 1]
    run = np.cumsum(starts) - 1
    first = np.nonzero(starts)[0][run]
    return run * 1000 + (np.arange(z.size) - first) // HOLDOUT_SLAB


def with_context(z: np.ndarray, margin: int, n_slices: int) -> tuple[np.ndarray, np.ndarray]:
    """(slice indices, scored flags): each slab of the held-out slices ``z`` with ``margin`` of the scan's own
    slices above and below it (the end slice repeated beyond the scan's ends, as detection does), which a 2.5D
    model sees as its neighbours but which are never scored. ``margin`` 0: ``z`` itself, all scored."""
    if margin <= 0:
        return z, np.ones(z.size, bool)
    slab = _slabs(z)
    stacked, scored = [], []
    for number in np.unique(slab):  # _slabs numbers increase along z
        rows = z[slab == number]
        before = np.clip(np.arange(rows[0] - margin, rows[0]), 0, n_slices - 1)
        after = np.clip(np.arange(rows[-1] + 1, rows[-1] + 1 + margin), 0, n_slices - 1)
        stacked += [before, rows, after]
        scored += [np.zeros(margin, bool), np.ones(rows.size, bool), np.zeros(margin, bool)]
    return np.concatenate(stacked), np.concatenate(scored)


def context_margin(spacing_z: float, per_side: int, distance_mm: float) -> int:
    """Slices stacked on each side of a held-out slab for a 2.5D model (``per_side`` neighbours ``distance_mm``
    apart): as many as its neighbours reach, on the scan and on the thick-slice variant (pairs averaged, twice the
    spacing, ``thick_pairs``), so that every scored slice sees real neighbours in both. 0 for a 2D model."""
    if per_side <= 0:
        return 0
    return per_side * max(io.neighbour_offset(spacing_z, distance_mm),
                          2 * io.neighbour_offset(2 * spacing_z, distance_mm))


def thick_pairs(blocks: np.ndarray, scored: np.ndarray) -> np.ndarray:
    """(P, 2) rows of consecutive slices averaged into one by the thick-slice variant: within each block (a held-out
    slab and its context margins), aligned so that the block's first scored slice starts a pair — a pair of two
    scored slices is scored, a pair that takes in a context slice is context; a block's odd slice out is dropped."""
    pairs = []
    for number in np.unique(blocks):  # block numbers increase along the stack
        rows = np.nonzero(blocks == number)[0]
        first = rows[scored[rows]][0] if scored[rows].any() else rows[0]
        pairs += [(i, i + 1) for i in range(rows[0] + (first - rows[0]) % 2, rows[-1], 2)]
    return np.array(pairs, dtype=int).reshape(-1, 2)


def holdout_volumes(data_dir, holdout_every: int, normal_cases: Optional[list], work: Path, seed: int = 0,
                    min_lung_fraction: float = 0.005, context: tuple[int, float] = (0, 0.0)):
    """Per case: (CT path, lung path, truth mask (z, y, x), clean-slice flags, scored-slice flags) of the stacked
    held-out slices; clean and lesion slabs alternate (module docstring). ``context`` (slices per side, mm apart; a
    2.5D model's ``ModelConfig.context_slices`` / ``context_mm``) stacks every slab with the real slices its
    neighbours reach (``with_context``): unscored and lesion-free but for the masses' continuation, so the scored
    slices and their lesions are those a 2D model is validated on."""
    rng = np.random.default_rng(seed)
    mass_rng, mass_count = np.random.default_rng([seed, 1]), 0
    volumes = []
    for name in healthy_cases(load_cases(data_dir), normal_cases):
        ct = io.read_ct(case_path(data_dir, name, "ct"))
        hu = io.ct_array(ct)
        lung = io.read_mask(case_path(data_dir, name, "lung"), ct)
        z = holdout_split(io.lung_slices(lung, min_lung_fraction), holdout_every)[1]  # as training split them
        if z.size == 0:
            continue
        margin = context_margin(ct.GetSpacing()[2], *context)
        z_all, scored = with_context(z, margin, hu.shape[0])
        slab_sizes = np.unique(_slabs(z), return_counts=True)[1]
        blocks = np.repeat(np.arange(slab_sizes.size), slab_sizes + 2 * margin)  # a slab and its margins
        sub_hu, sub_lung = hu[z_all].copy(), lung[z_all].astype(np.uint8)
        truth = np.zeros(sub_hu.shape, bool)
        kinds = np.zeros(sub_hu.shape, np.uint8)
        slab = np.full(z_all.size, -1)
        slab[scored] = np.unique(_slabs(z), return_inverse=True)[1]
        clean = (slab % 2 == 0) | ~scored  # the margins are clean, and unscored
        solids, masses = [], []
        for number in np.unique(slab[scored & ~clean]):
            rows = np.nonzero(slab == number)[0]
            for j, i in enumerate(rows):
                if j % 2 == 1:
                    sub_hu[i], truth[i], kinds[i] = synthetic_lesions(sub_hu[i], sub_lung[i] > 0, ct.GetSpacing()[:2],
                                                                      rng, with_kinds=True)
            block, drawn, placed = solid_nodules_3d(sub_hu[rows], sub_lung[rows] > 0, ct.GetSpacing(), rng)
            sub_hu[rows] = block
            truth[rows] |= drawn
            kinds[rows] = np.where(drawn, len(LESION_KINDS) + 1, kinds[rows])
            solids += placed
            # one mass per lesion slab, from its own stream (the lesions above stay those of earlier validations),
            # through the slab and its context slices; truth on the scored slices only
            around = np.arange(rows[0] - margin, rows[-1] + 1 + margin)
            mid = margin + rows.size // 2
            block, drawn, placed = solid_mass(sub_hu[around], sub_lung[around] > 0, ct.GetSpacing(), mass_rng, mid,
                                              PLACEMENTS[mass_count % len(PLACEMENTS)], truth[around[mid]])
            mass_count += 1
            sub_hu[around] = block
            drawn &= scored[around][:, None, None]
            truth[around] |= drawn
            kinds[around] = np.where(drawn, len(LESION_KINDS) + 2, kinds[around])
            masses += [placed] if placed else []
        image = sitk.GetImageFromArray(sub_hu)
        image.SetSpacing(ct.GetSpacing())
        image.SetDirection(ct.GetDirection())
        ct_path, lung_path = work / f"{name}_ct.nii.gz", work / f"{name}_lung.nii.gz"
        sitk.WriteImage(image, str(ct_path))
        io.write_image(sub_lung, image, lung_path)
        volumes.append({"case": name, "ct": ct_path, "lung": lung_path, "truth": truth, "kinds": kinds, "clean": clean,
                        "scored": scored, "slices": z_all.tolist(), "blocks": blocks, "solid_nodules": solids,
                        "masses": masses})
    return volumes


def model_holdout_volumes(data_dir, cfg, work: Path, holdout_every: Optional[int] = None,
                          normal_cases: Optional[list] = None, seed: int = 0):
    """``holdout_volumes`` as a model is validated on them: its hold-out period (``holdout_every`` when given),
    its minimum lung fraction and its context slices (``ModelConfig.context_slices`` / ``context_mm``)."""
    every = cfg.train.holdout_every if holdout_every is None else holdout_every
    return holdout_volumes(data_dir, every, normal_cases, work, seed, cfg.preprocess.min_lung_fraction,
                           (cfg.model.context_slices, cfg.model.context_mm))


VARIANTS = ("noise", "sharp", "thick", "8bit", "crop")  # other scanners and formats, from the same held-out slabs
VARIANT_CROP_MARGIN_MM = 5.0  # ``crop``: the image cut to the lungs' bounding box and this margin, like MedSeg's
VARIANT_NOISE_HU = 25.0  # added white noise (a lower dose)
VARIANT_SHARPEN = 0.8  # unsharp-mask gain over a 1-pixel Gaussian (a sharper reconstruction kernel)
# 8-bit pictures like the MedSeg slices: a 1300 HU lung window (their median fitted width), JPEG at quality 75 (their
# quantisation tables), read back to HU by the same per-image fit as MedSeg (``medseg.grey_to_hu``)
VARIANT_8BIT_WINDOW_HU = (-1150.0, 150.0)
VARIANT_JPEG_QUALITY = 75


def eight_bit_slice(hu: np.ndarray) -> np.ndarray:
    """One slice (Y, X) in HU as an 8-bit lung-window JPEG would give it back (see VARIANT_8BIT_WINDOW_HU)."""
    import io as bytes_io

    from PIL import Image

    from .medseg import grey_to_hu

    lo, hi = VARIANT_8BIT_WINDOW_HU
    grey = np.round(np.clip((hu - lo) / (hi - lo), 0.0, 1.0) * 255).astype(np.uint8)
    buffer = bytes_io.BytesIO()
    Image.fromarray(grey).save(buffer, "JPEG", quality=VARIANT_JPEG_QUALITY)
    buffer.seek(0)
    return grey_to_hu(np.asarray(Image.open(buffer).convert("L")))[0].astype(np.float32)


def scanner_variant(vol: dict, kind: str, work: Path, rng: np.random.Generator,
                    context: tuple[int, float] = (0, 0.0)) -> dict:
    """The held-out volume ``vol`` as another scanner would give it: ``noise`` adds VARIANT_NOISE_HU of white noise,
    ``sharp`` applies an in-plane unsharp mask (a sharper kernel), ``thick`` averages consecutive pairs of slices of
    each slab and its context margins (``thick_pairs``; twice the slice thickness, partial volume; lesion truth where
    the pair's mean ≥ 0.5, a pair is clean when both slices are, scored when both are; a 2.5D model's ``context``
    — per side, mm — must still find its neighbours inside the margins, else SACDiffError), ``8bit`` passes every
    slice through an 8-bit lung-window JPEG (``eight_bit_slice``), ``crop`` cuts the image in-plane to the lungs'
    bounding box plus VARIANT_CROP_MARGIN_MM (as the MedSeg pictures are: little body outside the lung to take α
    from, and the lungs fill the model's grid — a zoom).
    Lesions and lung masks are those of ``vol``; a new CT/lung file pair in ``work``."""
    image = sitk.ReadImage(str(vol["ct"]))
    hu = sitk.GetArrayFromImage(image).astype(np.float32)
    lung = sitk.GetArrayFromImage(sitk.ReadImage(str(vol["lung"])))
    truth, kinds, clean = vol["truth"], vol["kinds"], vol["clean"]
    scored = vol.get("scored", np.ones(len(clean), bool))
    spacing = list(image.GetSpacing())
    if kind == "noise":
        hu = hu + rng.normal(0.0, VARIANT_NOISE_HU, hu.shape).astype(np.float32)
    elif kind == "sharp":
        hu = hu + VARIANT_SHARPEN * (hu - ndimage.gaussian_filter(hu, (0, 1.0, 1.0)))
    elif kind == "8bit":
        hu = np.stack([eight_bit_slice(plane) for plane in hu])
    elif kind == "crop":
        margin = [int(round(VARIANT_CROP_MARGIN_MM / step)) for step in (spacing[1], spacing[0])]  # (y, x) pixels
        box = tuple(slice(max(int(ix.min()) - m, 0), int(ix.max()) + m + 1)
                    for ix, m in zip(np.nonzero(lung.any(0))[:2], margin))
        hu, lung, truth, kinds = (a[(slice(None),) + box] for a in (hu, lung, truth, kinds))
    elif kind == "thick":
        blocks = np.asarray(vol["blocks"]) if "blocks" in vol else _slabs(np.asarray(vol["slices"]))
        pairs = thick_pairs(blocks, scored)
        hu = np.stack([hu[p].mean(0) for p in pairs])
        lung = np.stack([lung[p].max(0) for p in pairs])
        truth = np.stack([truth[p].mean(0) >= 0.5 for p in pairs])
        kinds = np.stack([np.where(t, kinds[p].max(0), 0) for p, t in zip(pairs, truth)]).astype(np.uint8)
        clean = np.array([bool(clean[p].all()) for p in pairs])
        scored = np.array([bool(scored[p].all()) for p in pairs])
        spacing[2] *= 2
        blocks = blocks[pairs[:, 0]]
        need = context[0] * io.neighbour_offset(spacing[2], context[1]) if context[0] else 0
        for number in np.unique(blocks[scored]):
            inside = np.nonzero(scored[blocks == number])[0]
            if min(inside[0], (blocks == number).sum() - 1 - inside[-1]) < need:
                raise SACDiffError(f"the thick-slice variant of {vol['case']} leaves a scored slice without its "
                                   f"2.5D neighbours ({need} per side); build the held-out volumes with "
                                   "context_margin's margins")
        vol = {**vol, "slices": [vol["slices"][i] for i in pairs[:, 0]], "blocks": blocks}
    else:
        raise SACDiffError(f"unknown scanner variant {kind!r}; choose from {', '.join(VARIANTS)}")
    out = sitk.GetImageFromArray(np.round(hu).astype(np.int16))
    out.SetSpacing(spacing)
    out.SetDirection(image.GetDirection())
    ct_path, lung_path = work / f"{vol['case']}@{kind}_ct.nii.gz", work / f"{vol['case']}@{kind}_lung.nii.gz"
    sitk.WriteImage(out, str(ct_path))
    io.write_image(lung.astype(np.uint8), out, lung_path)
    return {**vol, "case": f"{vol['case']}@{kind}", "ct": ct_path, "lung": lung_path, "truth": truth, "kinds": kinds,
            "clean": clean, "scored": scored, "variant": kind}


def score_setting(results: list, lambdas=LAMBDAS) -> dict:
    """Label-free figures of one detection setting over the held-out volumes (see the module docstring)."""
    errors, truths, kinds = [], [], []
    flagged = {lam: [0, 0] for lam in lambdas}
    vessel_flagged = {lam: [0, 0] for lam in lambdas}
    per_case = {}
    pipeline = {lam: [] for lam in lambdas}
    healthy_error = []
    for i, (result, vol) in enumerate(results):
        scored = vol.get("scored", np.ones(len(vol["clean"]), bool))
        lung = (result.lung > 0) & scored[:, None, None]
        clean_lung = lung & vol["clean"][:, None, None]
        lesion_lung = lung & ~vol["clean"][:, None, None]
        healthy_error.append(result.error[clean_lung])
        errors.append(result.error[lesion_lung])
        truths.append(vol["truth"][lesion_lung])
        kinds.append(vol["kinds"][lesion_lung] if "kinds" in vol else vol["truth"][lesion_lung].astype(np.uint8))
        n_clean = int(clean_lung.sum())
        clean_vessels = (clean_lung & (result.ct_hu > VESSEL_HU) if getattr(result, "ct_hu", None) is not None
                         else np.zeros_like(clean_lung))
        case = per_case.setdefault(vol.get("case", str(i)), {"flagged_percent": {}, "alpha": {}})
        reference = getattr(result, "reference", None)  # the geometry; a figure in ml needs it
        voxel_ml = None if reference is None else float(np.prod(reference.GetSpacing())) / 1000.0
        for lam in lambdas:
            rethreshold(result, lam)
            mask = result.mask > 0
            hits_per_slice = (mask & clean_lung).sum(axis=(1, 2))
            hits = int(hits_per_slice.sum())
            flagged[lam][0] += hits
            flagged[lam][1] += n_clean
            vessel_flagged[lam][0] += int((mask & clean_vessels).sum())
            vessel_flagged[lam][1] += int(clean_vessels.sum())
            case["flagged_percent"][str(lam)] = 100.0 * hits / max(n_clean, 1)
            case["alpha"][str(lam)] = result.threshold.alpha
            if voxel_ml is not None:
                case.setdefault("worst_clean_slice_ml", {})[str(lam)] = float(hits_per_slice.max(initial=0) * voxel_ml)
            pipeline[lam].append((mask[lesion_lung], vol["truth"][lesion_lung]))
    error, truth = np.concatenate(errors), np.concatenate(truths)
    out = {
        "healthy_error": float(np.concatenate(healthy_error).mean()),
        "healthy_flagged_percent": {str(lam): 100.0 * f / max(n, 1) for lam, (f, n) in flagged.items()},
        "vessel_flagged_percent": {str(lam): 100.0 * f / max(n, 1) for lam, (f, n) in vessel_flagged.items()},
        "synthetic_voxel_auroc": auroc(error, truth),
        "synthetic_oracle_dice": oracle_dice(error, truth)[0],
        "synthetic_dice": {str(lam): segmentation_metrics(np.concatenate([p for p, _ in v]),
                                                          np.concatenate([t for _, t in v]))["dice"]
                           for lam, v in pipeline.items()},
        "synthetic_lesion_fraction_of_lung": float(truth.mean()),
        # flag the whole lung of the lesion slabs: the trivial baseline every Dice here stands beside
        "synthetic_baseline_dice": float(2 * truth.sum() / max(truth.sum() + truth.size, 1)),
    }
    # Per lesion kind (its voxels against the healthy voxels of the same slices): a kind the map misses shows here
    # even when the pooled figures, dominated by the large ground-glass patches, look fine.
    kind = np.concatenate(kinds)
    out["per_kind"] = {}
    for index, name in enumerate(KIND_NAMES):
        keep = (kind == index + 1) | ~truth
        positives = kind == index + 1
        if positives.any():
            out["per_kind"][name] = {"voxel_auroc": auroc(error[keep], positives[keep]),
                                     "oracle_dice": oracle_dice(error[keep], positives[keep])[0],
                                     "voxels": int(positives.sum())}
    ok = [lam for lam in lambdas if max(case["flagged_percent"][str(lam)] for case in per_case.values())
          <= FLAGGED_TARGET_PERCENT]  # every case, not only the pooled lung
    out["recommended_lambda"] = min(ok) if ok else None
    if ok:
        out["synthetic_dice_at_recommended"] = out["synthetic_dice"][str(min(ok))]
        out["vessel_flagged_percent_at_recommended"] = out["vessel_flagged_percent"][str(min(ok))]
    out["per_case"] = per_case
    return out


def worst_kind_oracle_dice(row: dict) -> float:
    return min((v["oracle_dice"] for v in row.get("per_kind", {}).values()), default=float("nan"))


def best_setting(rows: list[dict], tie: float = 0.01) -> Optional[dict]:
    """The declared rule (module docstring): among settings with a recommended λ, the highest worst-kind oracle
    Dice; within ``tie`` of it, the highest synthetic Dice at the recommended λ. None when no setting qualifies."""
    usable = [r for r in rows if r.get("recommended_lambda") is not None and np.isfinite(worst_kind_oracle_dice(r))]
    if not usable:
        return None
    top = max(worst_kind_oracle_dice(r) for r in usable)
    near = [r for r in usable if worst_kind_oracle_dice(r) >= top - tie]
    return max(near, key=lambda r: r["synthetic_dice_at_recommended"])


def parse_settings(text: Optional[str]) -> list[dict]:
    """``--settings 100x10x3,250x10x3h9s1`` → DetectConfig overrides (T_s × reverse steps × K, then optionally
    h<harmonise_steps>, r<harmonise_radius>, s<shift_tolerance>, e<error_radius>, m for ``--error
    min-of-errors``, p for ``--residual-sign hyperdense`` and v for ``--vessel-suppression``); None → the model's
    own setting."""
    import re

    if not text:
        return [{}]
    settings = []
    for item in text.split(","):
        match = re.fullmatch(r"(\d+)x(\d+)x(\d+)(?:h(\d+))?(?:r(\d+))?(?:s(\d+))?(?:e(\d+))?(m)?(p)?(v)?", item.strip().lower())
        if match is None:
            raise SACDiffError(f"--settings item {item!r} is not T_s×steps×K[h<N>][r<R>][s<R>][e<R>][m][p][v] (e.g. "
                               "150x10x3, 250x10x3h9r3s1, 250x10x3e2m, 250x10x3e2p or 100x10x3v)")
        steps, n, k, harmonise, radius, tolerance, error_radius, minimum, hyperdense, vessels = match.groups()
        setting = {"steps": int(steps), "sampling_steps": int(n), "ensemble": int(k)}
        if harmonise is not None:
            setting["harmonise_steps"] = int(harmonise)
        if radius is not None:
            setting["harmonise_radius"] = int(radius)
        if tolerance is not None:
            setting["shift_tolerance"] = int(tolerance)
        if error_radius is not None:
            setting["error_radius"] = int(error_radius)
        if minimum:
            setting["error"] = "min-of-errors"
        if hyperdense:
            setting["residual_sign"] = "hyperdense"
        if vessels:
            setting["vessel_suppression"] = True
        settings.append(setting)
    return settings


def write_validation(folder: Path, rows: list[dict], model_path, holdout_every: int) -> str:
    """validation.json (every figure) and validation.md (the table) into ``folder``; returns the table."""
    table = markdown(rows, Path(model_path).name)
    (folder / "validation.json").write_text(json.dumps({"model": str(model_path), "holdout_every": holdout_every,
                                                        "rows": rows}, indent=1, allow_nan=False), encoding="utf-8")
    (folder / "validation.md").write_text(table, encoding="utf-8")
    return table


def validate_settings(data_dir, model, diffusion, cfg, settings: list[dict], device, holdout_every: int,
                      normal_cases: Optional[list] = None, seed: int = 0, variants: tuple = ()) -> list[dict]:
    """One row per setting (a dict of DetectConfig overrides, e.g. {"steps": 150, "sampling_steps": 10}) and per
    scanner variant (``VARIANTS``; the original slabs first, variant None). A variant's row also holds
    ``flagged_percent_at_model_lambda``: % of clean lung flagged at the model's own λ, per case."""
    rows = []
    context = (cfg.model.context_slices, cfg.model.context_mm)
    with tempfile.TemporaryDirectory(prefix="sacdiff-validate-") as tmp:
        volumes = model_holdout_volumes(data_dir, cfg, Path(tmp), holdout_every, normal_cases, seed)
        if not volumes:
            raise SACDiffError(f"no held-out healthy slices in {data_dir} with holdout_every={holdout_every}")
        log.info("held-out slices: " + ", ".join(f"{v['case']} {len(v['slices'])}" for v in volumes))
        rng = np.random.default_rng(seed + 1)
        groups = [(None, volumes)] + [(kind, [scanner_variant(v, kind, Path(tmp), rng, context) for v in volumes])
                                      for kind in variants]
        for setting in settings:
            run_cfg = derive(cfg, detect=setting)
            for kind, group in groups:
                results = []
                for vol in group:
                    results.append((detect_volume(vol["ct"], model, diffusion, run_cfg, vol["lung"], device), vol))
                seconds = sum(r.facts["timings"]["total_s"] for r, _ in results)
                lambdas = tuple(sorted(set(LAMBDAS) | {float(run_cfg.detect.lam)}))
                row = {"setting": setting, "variant": kind, "seconds": seconds, **score_setting(results, lambdas)}
                row["model_lambda"] = float(run_cfg.detect.lam)
                row["flagged_percent_at_model_lambda"] = {
                    case: v["flagged_percent"][str(float(run_cfg.detect.lam))] for case, v in row["per_case"].items()}
                log.info(json.dumps({k: row[k] for k in ("setting", "variant", "healthy_error", "synthetic_voxel_auroc",
                                                         "synthetic_oracle_dice", "recommended_lambda",
                                                         "flagged_percent_at_model_lambda")}))
                rows.append(row)
    return rows


def markdown(rows: list[dict], model_name: str) -> str:
    lines = [f"# Label-free validation of {model_name} on held-out healthy slices", "",
             "| setting | mean E in healthy lung | % healthy lung flagged at λ = " + ", ".join(map(str, LAMBDAS))
             + " | synthetic voxel AUROC | synthetic oracle Dice | recommended λ (≤ 1 % flagged, every case) | "
             f"synthetic Dice at it | % clean vessels (> {VESSEL_HU:.0f} HU) flagged at it | oracle Dice per kind | s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        flagged = " / ".join(f"{r['healthy_flagged_percent'][str(lam)]:.2f}" for lam in LAMBDAS)
        name = f"{r['setting']}" + (f" [{r['variant']}]" if r.get("variant") else "")
        rec = r["recommended_lambda"]
        lines.append(f"| {name} | {r['healthy_error']:.5f} | {flagged} | {r['synthetic_voxel_auroc']:.4f} | "
                     f"{r['synthetic_oracle_dice']:.4f} | {'none' if rec is None else rec} | "
                     f"{r.get('synthetic_dice_at_recommended', float('nan')):.4f} | "
                     f"{r.get('vessel_flagged_percent_at_recommended', float('nan')):.2f} | "
                     + ", ".join(f"{k} {v['oracle_dice']:.3f}" for k, v in r.get("per_kind", {}).items())
                     + f" | {r['seconds']:.0f} |")
    best = best_setting([r for r in rows if not r.get("variant")])  # chosen on the held-out slabs as they are
    baselines = sorted({round(r["synthetic_baseline_dice"], 4) for r in rows if "synthetic_baseline_dice" in r})
    if baselines:
        lines += ["", "Trivial baseline (flag the whole lung of the lesion slabs): synthetic Dice "
                  + " / ".join(f"{b:.4f}" for b in baselines) + "."]
    lines += ["", "Chosen by the declared rule (highest worst-kind oracle Dice, ties within 0.01 by the synthetic Dice "
              "at the recommended λ): " + ("none qualifies (no λ of the grid flags ≤ 1 % of clean lung)" if best is None
                                          else f"**{best['setting']}** at λ {best['recommended_lambda']}"), ""]
    if any("flagged_percent_at_model_lambda" in r for r in rows):
        lines += ["", "% of clean lung flagged at the model's own λ, per case and scanner variant (goal ≤ 1 %):", "",
                  "| setting | variant | λ | " + " | ".join(rows[0]["flagged_percent_at_model_lambda"]) + " |",
                  "|---|---|---|" + "---|" * len(rows[0]["flagged_percent_at_model_lambda"])]
        for r in rows:
            values = r.get("flagged_percent_at_model_lambda", {})
            lines.append(f"| {r['setting']} | {r.get('variant') or 'as scanned'} | {r.get('model_lambda', '')} | "
                         + " | ".join(f"{v:.2f}" for v in values.values()) + " |")
        lines.append("")
    lines += ["Per case at the recommended λ (how stable the threshold is from scan to scan):", "",
              "| setting | case | % clean lung flagged | worst clean slice (ml) | α |", "|---|---|---|---|---|"]
    for r in rows:
        rec = r["recommended_lambda"]
        if rec is None:
            continue
        for case, v in r.get("per_case", {}).items():
            worst = v.get("worst_clean_slice_ml", {}).get(str(rec))
            lines.append(f"| {r['setting']} | {case} | {v['flagged_percent'][str(rec)]:.2f} | "
                         f"{'' if worst is None else f'{worst:.2f}'} | {v['alpha'][str(rec)]:.4f} |")
    return "\n".join(lines) + "\n"
