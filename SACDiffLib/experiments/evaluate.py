"""``sacdiff evaluate``: detection on every case of a data folder, scored as in Tables 1–2.

Any folder in the layout of ``../shared/data`` works: ``cases.json`` + ``ct/<case>_ct.nii.gz`` and optionally
``ct/<case>_lung.nii.gz`` (else the automatic lung mask), ``ct/<case>_lesion.nii.gz`` (voxel metrics, restricted to
the lung as in the paper) and ``slice_label_infection`` in cases.json (slice AUROC; the per-slice score is the
anomaly volume detected in the slice, in ml). Cases without labels report only their anomaly volume and the % of
lung flagged (for normal cases: the false-positive burden).

Writes ``cases.csv``, ``summary.json`` ({"cases", "medseg_covid", "mean"}) and ``summary.md`` into RESULTS, and each
case's detection run under ``RESULTS/runs/<case>``.

MedSeg 2D slices (``slices/medseg_covid``) are read, oriented, mapped to HU and scored by ``medseg.py`` (see its
docstring): per-slice mean and pooled metrics, each Dice beside the whole-lung baseline, voxel AUROC and oracle
Dice of E, slices without truth in the lung reported apart.

Every case with a voxel lesion mask also gets the voxel AUROC of E (lesion vs healthy lung voxels), the oracle Dice
(best single threshold on E) and the baseline Dice of flagging the whole lung: they separate "the map is bad" from
"the threshold is bad".
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk

from .. import io
from ..config import SACDiffConfig, derive, preset
from ..lung import LungSource, segment_lungs
from ..detect import detect_volume
from ..errors import SACDiffError
from . import medseg
from ..metrics import METRICS, auroc, oracle_dice, segmentation_metrics, summarise
from ..atomic import Output
from ..outputs import write_run
from ..data import case_path, load_cases, optional_path
from ..progress import Progress, log, part, quiet_notes

MAP_METRICS = ("baseline_dice", "voxel_auroc", "oracle_dice")  # whole lung flagged; E against the lesion mask
ALL_METRICS = METRICS + MAP_METRICS + ("slice_auroc",)
COLUMNS = ("case", "diagnosis", "status") + ALL_METRICS + ("anomaly_ml", "anomaly_percent_of_lung", "lung_ml", "alpha")


def score_case(result, lesion: Optional[np.ndarray], slice_labels: Optional[list]) -> dict:
    """Metrics a case's labels allow, from a finished detection."""
    q = result.quantification
    row = {"anomaly_ml": q["anomaly_ml"], "anomaly_percent_of_lung": q["anomaly_percent_of_lung"],
           "lung_ml": q["lung_ml"], "alpha": result.threshold.alpha}
    if lesion is not None:
        lung = result.lung > 0
        error, truth = result.error[lung], lesion[lung]  # scored inside the lung
        row.update(segmentation_metrics(result.mask[lung], truth))
        row["baseline_dice"] = segmentation_metrics(np.ones_like(truth), truth)["dice"]
        row["voxel_auroc"] = auroc(error, truth)
        row["oracle_dice"] = oracle_dice(error, truth)[0]
    if slice_labels is not None:
        n = min(len(slice_labels), len(q["slice_anomaly_ml"]))
        row["slice_auroc"] = auroc(q["slice_anomaly_ml"][:n], slice_labels[:n])
    return row


def evaluate(
    cases_dir,
    model,
    diffusion,
    cfg: SACDiffConfig,
    out_dir,
    device,
    overwrite: bool = False,
    progress: Optional[Progress] = None,
    lung_source: LungSource = LungSource(),
) -> dict:
    cases_dir, out_dir = Path(cases_dir), Path(out_dir)
    output = Output(out_dir, "results", overwrite, inputs=[cases_dir])
    cases = load_cases(cases_dir)
    todo = [name for name in sorted(cases) if case_path(cases_dir, name, "ct").exists()]
    if not todo:
        raise SACDiffError(f"no case of {cases_dir / 'cases.json'} has its CT at ct/<case>_ct.nii.gz")
    for name in todo:  # every case's files checked (complete, readable headers) before any work
        for kind in ("ct", "lung", "lesion"):
            path = optional_path(cases_dir, name, kind)
            if path is not None:
                try:
                    io.check_readable(path)
                except SACDiffError as exc:
                    raise SACDiffError(f"case {name}: {exc}") from None
    rows, per_case, failed = [], {}, {}
    with output as tmp:
        (tmp / "runs").mkdir()
        for i, name in enumerate(todo):
            info = cases[name]
            ct = case_path(cases_dir, name, "ct")
            lung = optional_path(cases_dir, name, "lung")
            lesion_path = case_path(cases_dir, name, "lesion")
            log.info(f"[{i + 1}/{len(todo)}] {name}")
            try:  # a case that fails in the work is reported; the other cases' results are kept
                result = detect_volume(ct, model, diffusion, cfg, lung, device, part(progress, i, len(todo), name),
                                       lung_source=lung_source)
                lesion = None
                if lesion_path.exists():
                    lesion = io.read_mask(lesion_path, result.reference, "lesion mask") > 0
                write_run(result, tmp / "runs" / name)
            except SACDiffError as exc:
                log.info(f"{name}: {exc}")
                failed[name] = str(exc)
                rows.append({"case": name, "diagnosis": info.get("diagnosis", ""), "status": f"error: {exc}"})
                continue
            row = score_case(result, lesion, info.get("slice_label_infection"))
            per_case[name] = {k: v for k, v in row.items() if k in ALL_METRICS or k.startswith("anomaly") or k == "alpha"}
            rows.append({"case": name, "diagnosis": info.get("diagnosis", ""), "status": "ok", **row})
        if not per_case:
            raise SACDiffError("every case failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
        medseg = {}
        medseg_dir = cases_dir / "slices" / "medseg_covid"
        if (medseg_dir / "image").is_dir():
            log.info(f"MedSeg slices in {medseg_dir}")
            medseg = evaluate_medseg(medseg_dir, model, diffusion, cfg, device, tmp / "medseg",
                                     lung_source=lung_source)
            _write_csv(tmp / "medseg_covid.csv", medseg.pop("per_slice"), MEDSEG_COLUMNS)
        stats = {m: st for m, st in summarise(list(per_case.values()), ALL_METRICS).items() if st["n"] > 0}
        summary = {
            "cases": per_case,
            "failed": failed,
            "medseg_covid": medseg,
            "mean": {m: st["mean"] for m, st in stats.items()},
            "mean_std": stats,
            "detect": {k: v for k, v in vars(cfg.detect).items()},
        }
        _write_csv(tmp / "cases.csv", rows)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1, default=float), encoding="utf-8")
        (tmp / "summary.md").write_text(_markdown(summary, rows), encoding="utf-8")
    return summary


def parse_sweep(text: str) -> list[tuple[int, int]]:
    """"3x10,3x25,1x25" → [(3, 10), (3, 25), (1, 25)] (K members × n respaced steps; n = 0 = every step)."""
    settings = []
    for item in text.split(","):
        try:
            k, n = item.lower().strip().split("x")
            settings.append((int(k), int(n)))
        except ValueError:
            raise SACDiffError(f"--sweep item {item!r} is not K×n (e.g. 3x25); give comma-separated settings") from None
        if settings[-1][0] < 1 or settings[-1][1] < 0:
            raise SACDiffError(f"--sweep item {item!r}: K must be ≥ 1 and n ≥ 0")
    return settings


def sweep(cases_dir, model, diffusion, cfg, out_dir, device, settings, overwrite=False, progress=None,
          lung_source: LungSource = LungSource()) -> str:
    """``evaluate`` once per (K, n) setting into OUT/<K>x<n>/, and a table of accuracy against network evaluations
    per slice (K × reverse steps) and wall time: OUT/sweep.md and OUT/sweep.json."""
    import time

    from ..detect import network_evaluations

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=overwrite)
    rows = []
    for i, (k, n) in enumerate(settings):
        run_cfg = derive(cfg, detect={"ensemble": k, "sampling_steps": n})
        log.info(f"[{i + 1}/{len(settings)}] K = {k}, reverse steps = {n or run_cfg.detect.steps}")
        t0 = time.perf_counter()
        with quiet_notes():  # the setting is the note; its cases are not
            summary = evaluate(cases_dir, model, diffusion, run_cfg, out_dir / f"{k}x{n}", device, overwrite,
                               part(progress, i, len(settings)), lung_source=lung_source)
        rows.append({"ensemble": k, "sampling_steps": n, "evaluations_per_slice": network_evaluations(run_cfg.detect),
                     "seconds": time.perf_counter() - t0, "mean_std": summary["mean_std"],
                     "medseg_covid": summary["medseg_covid"]})
    paper = network_evaluations(preset("paper").detect)  # 550 × 7: read from the preset, not retyped
    lines = ["| K | reverse steps | UNet evaluations per slice | × fewer than the paper (550 × 7) | "
             + " | ".join(ALL_METRICS) + " | seconds |", "|---|---|---|---|" + "---|" * (len(ALL_METRICS) + 1)]
    for r in rows:
        cells = [f"{r['mean_std'][m]['mean']:.4f} ({r['mean_std'][m]['std']:.4f})" if m in r["mean_std"] else ""
                 for m in ALL_METRICS]
        steps = r["sampling_steps"] or cfg.detect.steps
        lines.append(f"| {r['ensemble']} | {steps} | {r['evaluations_per_slice']} | "
                     f"{paper / r['evaluations_per_slice']:.0f} | " + " | ".join(cells) + f" | {r['seconds']:.0f} |")
    table = "\n".join(lines) + "\n"
    (out_dir / "sweep.md").write_text(table, encoding="utf-8")
    (out_dir / "sweep.json").write_text(json.dumps(rows, indent=1, default=float), encoding="utf-8")
    return table




def evaluate_medseg(folder, model, diffusion, cfg, device, work_dir,
                    lung_source: LungSource = LungSource()) -> dict:
    """Detect on every MedSeg slice (axial view, HU fitted per image; the automatic lung mask of
    ``lung_source.method``) and score them all (``medseg.score_slices``); unreadable slices are listed with their
    reason."""
    folder, work_dir = Path(folder), Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    scored, failed = [], []
    for path in medseg.list_slices(folder):
        mask_path = folder / "mask" / f"{path.stem}.png"
        if not mask_path.exists():
            failed.append({"slice": path.stem, "status": "no mask"})
            continue
        try:
            hu, truth, _ = medseg.read_slice(path, mask_path)
        except ValueError as exc:
            failed.append({"slice": path.stem, "status": str(exc)})
            continue
        image = sitk.GetImageFromArray(hu)
        image.SetSpacing(medseg.SPACING_MM)
        ct_path = work_dir / f"{path.stem}_ct.nii.gz"
        lung_path = work_dir / f"{path.stem}_lung.nii.gz"
        sitk.WriteImage(image, str(ct_path))
        try:
            if lung_source.method == "learned":
                from ..lungnet import learned_lungs

                lung = learned_lungs(hu, image, lung_source.model)
            else:
                lung = segment_lungs(hu, image, cropped=True)
            lung_image = sitk.GetImageFromArray(lung)
            lung_image.CopyInformation(image)
            sitk.WriteImage(lung_image, str(lung_path))
            result = detect_volume(ct_path, model, diffusion, cfg, lung_path, device)
        except SACDiffError as exc:
            log.info(f"MedSeg slice {path.stem}: {exc}")
            failed.append({"slice": path.stem, "status": f"error: {exc}"})
            continue
        scored.append({"name": path.stem, "pred": result.mask, "truth": truth, "lung": result.lung,
                       "error": result.error, "alpha": result.threshold.alpha})
    summary = medseg.score_slices(scored)
    summary["per_slice"] = summary["per_slice"] + failed
    summary["failed"] = [r["slice"] for r in failed]
    return summary


MEDSEG_COLUMNS = ("slice", "status") + METRICS + ("baseline_dice", "lung_fraction", "truth_outside_lung_fraction",
                                                  "alpha")


def _fmt(v) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def _write_csv(path: Path, rows: list[dict], columns=COLUMNS) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (_fmt(r[k]) if isinstance(r.get(k), float) else r.get(k, "")) for k in columns})


def _markdown(summary: dict, rows: list[dict]) -> str:
    d = summary["detect"]
    lines = [f"# SACDiff evaluation (T_s={d['steps']}, K={d['ensemble']}, λ={d['lam']}, "
             f"threshold={d['threshold']}, CRF={'on' if d['crf'] else 'off'})", "",
             "| case | diagnosis | " + " | ".join(ALL_METRICS) + " | anomaly ml | % lung | α |",
             "|---|---|" + "---|" * (len(ALL_METRICS) + 3)]
    for r in rows:
        if r.get("status", "ok") != "ok":
            lines.append(f"| {r['case']} | {r['diagnosis']} | {r['status']} |" + " |" * (len(ALL_METRICS) + 2))
            continue
        lines.append(f"| {r['case']} | {r['diagnosis']} | " + " | ".join(_fmt(r.get(m)) for m in ALL_METRICS)
                     + f" | {r['anomaly_ml']:.1f} | {r['anomaly_percent_of_lung']:.2f} | {r['alpha']:.4f} |")
    ms = summary["mean_std"]
    lines.append("| **mean (std)** | | " + " | ".join(
        f"{ms[m]['mean']:.4f} ({ms[m]['std']:.4f})" if m in ms else "" for m in ALL_METRICS) + " | | | |")
    lines += ["", "Voxel metrics are restricted to the lung mask; slice AUROC scores each slice by its detected "
              "anomaly volume (ml). Mean (std) over the cases that have the label (population std)."]
    if summary["medseg_covid"].get("n_scored"):
        lines += [""] + medseg_markdown(summary["medseg_covid"])
    return "\n".join(lines) + "\n"


def medseg_markdown(m: dict) -> list[str]:
    """The MedSeg section of summary.md: per-slice mean and pooled metrics beside the whole-lung baseline."""
    mean = m["mean"]
    lines = [f"## MedSeg COVID-19 slices ({m['n_scored']} scored)", "",
             "| | " + " | ".join(METRICS) + " | baseline Dice (whole lung) |", "|---|" + "---|" * (len(METRICS) + 1),
             "| per-slice mean (std) | " + " | ".join(f"{mean[k]['mean']:.4f} ({mean[k]['std']:.4f})" for k in METRICS)
             + f" | {mean['baseline_dice']['mean']:.4f} |",
             "| pooled (all lung pixels) | " + " | ".join(_fmt(m["pooled"][k]) for k in METRICS)
             + f" | {m['baseline_pooled_dice']:.4f} |", "",
             f"Voxel AUROC of E (lesion vs healthy lung, pooled): **{m['voxel_auroc']:.4f}**; oracle Dice (best single "
             f"threshold on E, pooled): **{m['oracle_dice']:.4f}**. Truth outside the fallback lung mask: "
             f"{m['truth_outside_lung_fraction']:.1%} of the truth pixels.",
             *([f"α from slice to slice (each slice is its own scan): median {m['alpha_spread']['median']:.4f}, "
                f"5–95 % {m['alpha_spread']['p5']:.4f}–{m['alpha_spread']['p95']:.4f} "
                f"(ratio {m['alpha_spread']['p95_over_p5']:.1f})."] if m.get("alpha_spread") else []),
             f"Slices with no truth inside the lung (left out of the means): {', '.join(m['no_truth_in_lung']) or 'none'}.",
             "Images transposed to the radiological axial view; grey levels mapped to HU per image (lung peak ↦ −850, "
             "soft-tissue peak ↦ +40 HU; `SACDiffLib/experiments/medseg.py`); lung mask from SACDiff's fallback; per-slice rows in "
             "medseg_covid.csv."]
    return lines
