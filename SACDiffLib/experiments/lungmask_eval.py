"""The lung masks measured against what the detector needs (the learned network vs the classical threshold):

- healthy cases (the network's held-out slabs): Dice against the airway-free threshold mask, and the share of the
  mask's voxels that are dense tissue (> −320 HU) outside that reference (heart, mediastinum, chest wall, abdomen);
- nsclc_lung1: the share of the radiologist's tumour inside the mask; the trachea and main bronchi (found on the
  case's own mask) inside the mask;
- MedSeg COVID-19 slices: the share of the radiologists' infection pixels inside the mask, pooled and per slice;
- inference time of the learned mask on the largest healthy volume;
- label-free: severe synthetic pathology (``lungnet.synthetic_pathology``, kinds whole / lobar / dependent, a fixed
  seed) drawn into the held-out healthy slabs, and the share of its pixels the network keeps inside (on its grid,
  P > 0.5; with neighbours, and alone as a single 2D image). Drawn by the training generator, so it shows a network
  that got worse, not one that generalises.

With ``--edges 3,1.5,0`` (``edge_candidates``): the learned mask with each inward edge distance of
``lungnet.refine_edges`` side by side, and the same severe synthetic pathology scored inside the *finished* mask on
the CT grid (round four of Resources/results/lungmask.md).

No lesion label chooses anything here: the labels only score the two finished methods.

    python -m SACDiffLib.experiments.lungmask_eval --data ../shared/data --model M.pt --out results.json

``--out`` names a new JSON file (its ``.md`` is written beside it); ``--overwrite`` replaces only a pair this module
wrote (the JSON carries ``"written_by": "SACDiff"``). Both files are put in place whole, after the work.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from .. import io
from ..atomic import Output, replaced_file, write_json, written_by_sacdiff
from ..data import case_path, holdout_split, load_cases
from ..errors import SACDiffError
from ..lung import airway_tree, segment_lungs
from ..lungnet import INWARD_EDGE_MM, learned_lungs, read_lungnet


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    total = int(a.sum() + b.sum())
    return 2 * int((a & b).sum()) / total if total else 1.0


def _reference_lungs(data_dir: Path, name: str):
    """(CT image, HU array, the case's lung mask without the trachea and main bronchi — the label the network was
    trained on and the reference the healthy figures score against)."""
    ct = io.read_ct(case_path(data_dir, name, "ct"))
    hu = io.ct_array(ct)
    reference = io.read_mask(case_path(data_dir, name, "lung"), ct) > 0
    reference &= ~airway_tree(hu, reference, ct)
    return ct, hu, reference


def _healthy_scores(mask: np.ndarray, reference: np.ndarray, held: np.ndarray, hu: np.ndarray) -> dict:
    """Dice on the held-out slices, and the share of the mask that is dense tissue (> −320 HU) outside the reference
    (heart, mediastinum, chest wall, abdomen)."""
    dense_outside = mask & ~reference & (hu > -320)
    return {"dice_held_out": dice(mask[held], reference[held]),
            "dense_outside_percent": 100 * float(dense_outside.sum()) / max(int(mask.sum()), 1)}


def healthy_figures(data_dir: Path, model, cases: list[str], holdout_every: int) -> list[dict]:
    rows = []
    for name in cases:
        ct, hu, reference = _reference_lungs(data_dir, name)
        t0 = time.perf_counter()
        learned = learned_lungs(hu, ct, model) > 0
        seconds = time.perf_counter() - t0
        classical = segment_lungs(hu, ct) > 0
        held = holdout_split(np.arange(hu.shape[0]), holdout_every)[1]
        row = {"case": name, "slices": int(hu.shape[0]), "held_out_slices": int(held.size), "seconds": seconds}
        for label, mask in (("learned", learned), ("classical", classical)):
            row[label] = {**_healthy_scores(mask, reference, held, hu), "dice_all": dice(mask, reference)}
        rows.append(row)
    return rows


def _nsclc_case(data_dir: Path):
    """(CT image, HU array, radiologist's tumour, trachea and main bronchi found on the case's own lung mask)."""
    ct = io.read_ct(case_path(data_dir, "nsclc_lung1", "ct"))
    hu = io.ct_array(ct)
    tumour = io.read_mask(case_path(data_dir, "nsclc_lung1", "lesion"), ct) > 0
    airway = airway_tree(hu, io.read_mask(case_path(data_dir, "nsclc_lung1", "lung"), ct) > 0, ct)
    return ct, hu, tumour, airway


def _nsclc_scores(mask: np.ndarray, tumour: np.ndarray, airway: np.ndarray) -> dict:
    airway_slices = [z for z in range(mask.shape[0]) if airway[z].any()]
    return {"tumour_inside_percent": 100 * float((tumour & mask).sum()) / max(int(tumour.sum()), 1),
            "airway_inside_percent": 100 * float((airway & mask).sum()) / max(int(airway.sum()), 1),
            "slices_with_airway_inside": int(sum((airway[z] & mask[z]).sum() > 0.1 * airway[z].sum()
                                                 for z in airway_slices))}


def nsclc_figures(data_dir: Path, model) -> dict:
    ct, hu, tumour, airway = _nsclc_case(data_dir)
    out = {"tumour_voxels": int(tumour.sum()), "airway_voxels": int(airway.sum())}
    for label, mask in (("learned", learned_lungs(hu, ct, model) > 0), ("classical", segment_lungs(hu, ct) > 0)):
        out[label] = _nsclc_scores(mask, tumour, airway)
    return out


def medseg_figures(folder: Path, model, inward_mm: float = INWARD_EDGE_MM) -> dict:
    import SimpleITK as sitk

    from .medseg import SPACING_MM, list_slices, read_slice

    rows = []
    for image_path in list_slices(folder):
        hu, truth, _ = read_slice(image_path, folder / "mask" / f"{image_path.stem}.png")
        image = sitk.GetImageFromArray(hu)
        image.SetSpacing(SPACING_MM)
        row = {"slice": image_path.stem, "truth_pixels": int(truth.sum())}
        for label, make in (("learned", lambda: learned_lungs(hu, image, model, inward_mm=inward_mm)),
                            ("classical", lambda: segment_lungs(hu, image, cropped=True))):
            try:
                mask = make() > 0
                row[label] = 100 * float((truth & mask).sum()) / max(int(truth.sum()), 1)
            except Exception as exc:  # a method that finds no lung keeps none of the infection
                row[label], row[f"{label}_error"] = 0.0, str(exc)
        rows.append(row)
    scored = [r for r in rows if r["truth_pixels"]]
    total = sum(r["truth_pixels"] for r in scored)
    summary = {}
    for label in ("learned", "classical"):
        values = np.array([r[label] for r in scored])
        summary[label] = {"pooled_inside_percent": sum(r[label] * r["truth_pixels"] for r in scored) / total,
                          "worst_slice_percent": float(values.min()),
                          "slices_below_80_percent": int((values < 80).sum()),
                          "failures": sum(f"{label}_error" in r for r in rows)}
    return {"slices": len(scored), "summary": summary, "per_slice": rows}


SEVERE_KINDS = ("whole", "lobar", "dependent")


def _inside_figures(pairs: list) -> dict:
    """Pooled % of lesion pixels inside a mask, the worst slice and the slices below 80 %, from (kept, lesion pixels)
    per slice (slices without lesion pixels left out)."""
    kept, total = np.array([p for p in pairs if p[1]], np.int64).reshape(-1, 2).T
    per_slice = 100 * kept / np.maximum(total, 1)
    return {"slices": int(per_slice.size), "pooled_inside_percent": 100 * float(kept.sum()) / max(int(total.sum()), 1),
            "worst_slice_percent": float(per_slice.min()) if per_slice.size else 0.0,
            "slices_below_80_percent": int((per_slice < 80).sum())}


def _severe_samples(data_dir: Path, cfg, cases: list[str], holdout_every: int, seed: int):
    """Yield (case, slice z, variant, stack, stack with severe synthetic pathology, lung on the network's grid) for
    each held-out slice with lung, with its neighbours and as a single slice: the lesions of one slice are drawn
    from ``default_rng([seed, i])`` (i its index among the held-out slices), the same for both variants."""
    from ..lungnet import synthetic_pathology, training_slices

    stacks, labels, pixel, used = training_slices(data_dir, cfg, cases, holdout_every, split="held-out")
    slices = [(name, z) for name, z_list in used for z in z_list]
    for i, (name, z) in enumerate(slices):
        lung = labels[i, 0].numpy() > 0
        if lung.sum() < 200:
            continue
        for variant in ("with neighbours", "single slice"):
            x = stacks[i].float().numpy()
            if variant == "single slice":
                x[1:] = x[:1]
            sick = synthetic_pathology(x, lung, np.random.default_rng([seed, i]), cfg, float(pixel[i]), SEVERE_KINDS)
            yield name, z, variant, x, sick, lung


def synthetic_inclusion(data_dir: Path, model, cases: list[str], holdout_every: int, seed: int = 12345) -> dict:
    import torch

    from ..lungnet import HU_CHANGED, load_lungnet, logits

    cfg, net, _ = load_lungnet(model)
    changed_units = HU_CHANGED * 2 / (cfg.hu_window[1] - cfg.hu_window[0])
    pairs = {"with neighbours": [], "single slice": []}
    for _, _, variant, x, sick, lung in _severe_samples(data_dir, cfg, cases, holdout_every, seed):
        lesion = lung & (np.abs(sick[0] - x[0]) > changed_units)
        if not lesion.any():
            continue
        with torch.inference_mode():
            inside = (torch.sigmoid(logits(net, torch.from_numpy(sick)[None]))[0, 0].numpy() > 0.5)[lesion]
        pairs[variant].append((int(inside.sum()), int(lesion.sum())))
    return {variant: _inside_figures(p) for variant, p in pairs.items()}


def _held_out_severe_volumes(data_dir: Path, model, cases: list[str], holdout_every: int, seed: int):
    """Yield (variant, 3-slice HU volume, its image, lesion on the middle slice): ``synthetic_inclusion``'s lesions
    (``_severe_samples``) carried from the network's grid onto each held-out slice's CT grid — the slice and its two
    neighbours (``cfg.context_mm`` away, or the slice itself three times for "single slice"), stacked as a volume
    whose slice spacing makes them neighbours — so the whole of ``learned_lungs`` can run."""
    import SimpleITK as sitk
    import torch

    from ..lungnet import HU_CHANGED, load_lungnet

    cfg, _, _ = load_lungnet(model)
    units_to_hu = (cfg.hu_window[1] - cfg.hu_window[0]) / 2
    loaded = None
    for name, z, variant, x, sick, _ in _severe_samples(data_dir, cfg, cases, holdout_every, seed):
        if loaded is None or loaded[0] != name:
            ct, hu, lung_ct = _reference_lungs(data_dir, name)  # the label, as in training
            loaded = (name, ct, hu.astype(np.float32), lung_ct,
                      io.neighbour_offset(ct.GetSpacing()[2], cfg.context_mm))
        _, ct, hu, lung_ct, offset = loaded
        # the stack's channel order (z, z − d, z + d)
        rows = [z, z, z] if variant == "single slice" else [z, max(z - offset, 0), min(z + offset, hu.shape[0] - 1)]
        delta = io.from_model_grid(torch.from_numpy((sick - x) * units_to_hu)[:, None], hu.shape[1:]).numpy()
        volume = (hu[rows] + delta)[[1, 0, 2]]  # as slices (z − d, z, z + d)
        lesion = (np.abs(delta[0]) > HU_CHANGED) & lung_ct[z]  # a soft edge reaches one pixel past the lung
        image = sitk.GetImageFromArray(volume)
        sx, sy, sz = ct.GetSpacing()
        image.SetSpacing((sx, sy, sz * max(offset, 1)))
        yield variant, volume, image, lesion


def edge_candidates(data_dir, model, inward_mm=(3.0, 1.5, 0.0), holdout_every: int = 4, seed: int = 12345,
                    medseg: bool = False) -> dict:
    """The learned mask with each inward edge distance of ``refine_edges`` (one network pass per volume): healthy
    held-out Dice and dense tissue outside the reference per case, nsclc_lung1's tumour and airways, and — label-free
    — the share of severe synthetic pathology inside the *finished* mask on the CT grid (``synthetic_inclusion``
    scores the network's raw output on its own grid, before the edge refinement that can cut a dense rim)."""
    from scipy import ndimage

    from ..lungnet import load_lungnet, lung_probability, lungs_from_probability, refine_edges

    data_dir = Path(data_dir)
    cfg, net, _ = load_lungnet(model)
    cases = _training_cases(data_dir, model)
    out = {"model": str(model), "inward_mm": list(inward_mm), "healthy": [], "synthetic_severe": {}}
    for name in cases:
        ct, hu, reference = _reference_lungs(data_dir, name)
        held = holdout_split(np.arange(hu.shape[0]), holdout_every)[1]
        probability = lung_probability(hu, ct, net, cfg)
        row = {"case": name}
        for mm in inward_mm:
            mask = lungs_from_probability(hu, probability, ct, inward_mm=mm) > 0
            row[str(mm)] = _healthy_scores(mask, reference, held, hu)
        out["healthy"].append(row)
    counts = {}
    for variant, volume, image, lesion in _held_out_severe_volumes(data_dir, model, cases, holdout_every, seed):
        probability = lung_probability(volume, image, net, cfg)
        masks = {"raw": probability[1] > 0.5}
        for mm in inward_mm:
            # the per-slice steps alone (edges, holes), then the whole pipeline; its 3D steps (the two largest
            # components, airway tracking) see a 3-slice volume here, not a scan, and can drop a small apical or
            # basal lung piece that a whole scan would connect
            masks[f"{mm} slice steps"] = ndimage.binary_fill_holes(refine_edges(volume, probability > 0.5, image,
                                                                                mm)[1])
            masks[str(mm)] = lungs_from_probability(volume, probability, image, inward_mm=mm)[1] > 0
        for key, mask in masks.items():
            counts.setdefault(variant, {}).setdefault(key, []).append((int((mask & lesion).sum()), int(lesion.sum())))
    out["synthetic_severe"] = {variant: {mm: _inside_figures(pairs) for mm, pairs in by_mm.items()}
                               for variant, by_mm in counts.items()}
    if case_path(data_dir, "nsclc_lung1", "lesion").exists():
        ct, hu, tumour, airway = _nsclc_case(data_dir)
        probability = lung_probability(hu, ct, net, cfg)
        out["nsclc_lung1"] = {str(mm): _nsclc_scores(lungs_from_probability(hu, probability, ct, inward_mm=mm) > 0,
                                                     tumour, airway) for mm in inward_mm}
    if medseg and (data_dir / "slices" / "medseg_covid").is_dir():
        out["medseg"] = {str(mm): medseg_figures(data_dir / "slices" / "medseg_covid", model, mm)["summary"]["learned"]
                         for mm in inward_mm}
    return out


def edge_markdown(r: dict) -> str:
    """One row per inward edge distance of ``edge_candidates``."""
    lines = ["| inward edge, mm | healthy Dice held-out (per case) | dense outside, % of mask (per case) | synthetic "
             "severe inside, % pooled / worst slice / slices < 80 % (with neighbours; single slice) | nsclc tumour "
             "inside, % | nsclc slices with airway inside | MedSeg inside, % pooled / worst / slices < 80 % |",
             "|---|---|---|---|---|---|---|"]
    for mm in ["raw"] + [str(m) for m in r["inward_mm"]]:
        syn = "; ".join(f"{v[mm]['pooled_inside_percent']:.1f} / {v[mm]['worst_slice_percent']:.0f} / "
                        f"{v[mm]['slices_below_80_percent']}" for v in r["synthetic_severe"].values())
        if mm == "raw":
            lines.append(f"| network alone (P > 0.5, CT grid) | | | {syn} | | | |")
            continue
        steps = "; ".join(f"{f['pooled_inside_percent']:.1f} / {f['worst_slice_percent']:.0f} / "
                          f"{f['slices_below_80_percent']}"
                          for f in (v[mm + " slice steps"] for v in r["synthetic_severe"].values()))
        syn += f" (per-slice steps alone: {steps})"
        healthy = " / ".join(f"{row[mm]['dice_held_out']:.3f}" for row in r["healthy"])
        dense = " / ".join(f"{row[mm]['dense_outside_percent']:.2f}" for row in r["healthy"])
        n = r.get("nsclc_lung1", {}).get(mm, {})
        m = r.get("medseg", {}).get(mm)
        lines.append(f"| {mm} | {healthy} | {dense} | {syn} | {n.get('tumour_inside_percent', float('nan')):.1f} | "
                     f"{n.get('slices_with_airway_inside', '')} | " + (
                         f"{m['pooled_inside_percent']:.1f} / {m['worst_slice_percent']:.0f} / "
                         f"{m['slices_below_80_percent']}" if m else "") + " |")
    return "\n".join(lines) + "\n"


def _training_cases(data_dir: Path, model) -> list[str]:
    """The healthy cases the network was trained on (its recorded settings), else those whose diagnosis says normal."""
    payload = read_lungnet(model)
    settings = (payload["train_state"] or {}).get("settings") or payload["extra"].get("settings", {})
    return settings.get("cases") or sorted(n for n, d in load_cases(data_dir).items()
                                           if "normal" in str(d.get("diagnosis", "")))


def evaluate_lung_masks(data_dir, model, holdout_every: int = 4) -> dict:
    data_dir = Path(data_dir)
    cases = _training_cases(data_dir, model)
    out = {"model": str(model), "healthy": healthy_figures(data_dir, model, cases, holdout_every),
           "synthetic_severe": synthetic_inclusion(data_dir, model, cases, holdout_every)}
    if case_path(data_dir, "nsclc_lung1", "lesion").exists():
        out["nsclc_lung1"] = nsclc_figures(data_dir, model)
    medseg = data_dir / "slices" / "medseg_covid"
    if medseg.is_dir():
        out["medseg"] = medseg_figures(medseg, model)
    return out


def markdown(r: dict) -> str:
    lines = ["| healthy case | Dice held-out slabs (learned / classical) | dense tissue outside the reference, % of "
             "mask (learned / classical) | learned mask, s |", "|---|---|---|---|"]
    for row in r["healthy"]:
        lines.append(f"| {row['case']} ({row['slices']} slices) | {row['learned']['dice_held_out']:.3f} / "
                     f"{row['classical']['dice_held_out']:.3f} | {row['learned']['dense_outside_percent']:.2f} / "
                     f"{row['classical']['dense_outside_percent']:.2f} | {row['seconds']:.1f} |")
    for variant, v in r.get("synthetic_severe", {}).items():
        lines += ["", f"Synthetic severe pathology on the held-out healthy slabs ({variant}, {v['slices']} slices, "
                      f"label-free): {v['pooled_inside_percent']:.1f} % of its pixels inside the network's mask; "
                      f"worst slice {v['worst_slice_percent']:.0f} %; slices below 80 %: {v['slices_below_80_percent']}"]
    if "nsclc_lung1" in r:
        n = r["nsclc_lung1"]
        lines += ["", f"nsclc_lung1: tumour inside the mask {n['learned']['tumour_inside_percent']:.1f} % learned, "
                      f"{n['classical']['tumour_inside_percent']:.1f} % classical; trachea/main bronchi inside "
                      f"{n['learned']['airway_inside_percent']:.1f} % learned "
                      f"({n['learned']['slices_with_airway_inside']} slices with > 10 % of their airway inside), "
                      f"{n['classical']['airway_inside_percent']:.1f} % classical"]
    if "medseg" in r:
        m = r["medseg"]["summary"]
        lines += ["", f"MedSeg ({r['medseg']['slices']} slices with infection): infection pixels inside the mask, pooled "
                      f"{m['learned']['pooled_inside_percent']:.1f} % learned vs "
                      f"{m['classical']['pooled_inside_percent']:.1f} % classical; worst slice "
                      f"{m['learned']['worst_slice_percent']:.0f} % vs {m['classical']['worst_slice_percent']:.0f} %; "
                      f"slices below 80 %: {m['learned']['slices_below_80_percent']} vs "
                      f"{m['classical']['slices_below_80_percent']}; no lung found: {m['learned']['failures']} vs "
                      f"{m['classical']['failures']}"]
    return "\n".join(lines) + "\n"


def _outputs(out: str, overwrite: bool, inputs: list) -> tuple[Output, Path]:
    """The JSON output (checked now, written whole later) and the .md beside it, which may be replaced only where
    the JSON is this module's own (the pair was written together)."""
    target = Path(out)
    if target.suffix != ".json":
        raise SACDiffError(f"--out {out}: name a .json file (its .md is written beside it)")
    output = Output(target, "json", overwrite, inputs=inputs)
    markdown_file = target.with_suffix(".md")
    if (markdown_file.exists() or markdown_file.is_symlink()) and not (
            overwrite and written_by_sacdiff(target, "json") and markdown_file.is_file()
            and not markdown_file.is_symlink()):
        raise SACDiffError(f"{markdown_file} already exists and is not the pair of a JSON this module wrote; "
                           "choose another --out")
    return output, markdown_file


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True, help="a new JSON file (its .md is written beside it)")
    p.add_argument("--overwrite", action="store_true", help="replace a JSON/.md pair this module wrote earlier")
    p.add_argument("--edges", help="compare inward edge distances of refine_edges instead, mm, e.g. 3,1.5,0")
    p.add_argument("--medseg", action="store_true", help="with --edges: also the MedSeg infection inside each mask")
    args = p.parse_args(argv)
    if args.medseg and not args.edges:
        p.error("--medseg goes with --edges (the default run scores MedSeg already)")
    if args.edges:
        try:
            inward = tuple(float(v) for v in args.edges.split(","))
        except ValueError:
            p.error(f"--edges {args.edges!r}: give distances in mm separated by commas, e.g. 3,1.5,0")
        if not all(0 <= v <= 20 for v in inward):
            p.error(f"--edges {args.edges!r}: each distance must lie in 0…20 mm")
    try:
        output, markdown_file = _outputs(args.out, args.overwrite, [args.data, args.model])
    except SACDiffError as exc:
        p.error(str(exc))
    from ..allocator import keep_freed_memory

    keep_freed_memory()
    if args.edges:
        r = edge_candidates(args.data, args.model, inward, medseg=args.medseg)
        text = edge_markdown(r)
    else:
        r = evaluate_lung_masks(args.data, args.model)
        text = markdown(r)
    with replaced_file(markdown_file) as markdown_tmp, output as tmp:  # the JSON commits first; a failure keeps both
        write_json(tmp, r, allow_nan=True)
        markdown_tmp.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
