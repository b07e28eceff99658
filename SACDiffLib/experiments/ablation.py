"""``sacdiff ablation``: the generative rows of Tables 1–2 in one command.

Four networks cover every row — {Gaussian, simplex noise} × {unconditional, lung-conditioned (anatomy guidance)} —
each trained on the normal cases of ``--train`` (or taken from ``--models DIR`` as ``<noise>-<guidance>.pt``). Every
row then runs detection on the labelled cases of ``--cases`` with its noise, guidance, threshold and K:

    row                           simplex  guidance  adaptive  ensemble
    DDPM                             ·        ·         ·         ·
    AnoDDPM                          ✓        ·         ·         ·
    (a) DDPM + guidance              ·        ✓         ·         ·
    (b) DDPM + adaptive              ·        ·         ✓         ·
    (c) AnoDDPM + guidance           ✓        ✓         ·         ·
    (d) simplex + adaptive           ✓        ·         ✓         ·
    (e) guidance + adaptive          ·        ✓         ✓         ·
    SAC-Diff w/o ensemble            ✓        ✓         ✓         ·
    SAC-Diff                         ✓        ✓         ✓         ✓ (K of the preset)

Rows without the background-adaptive threshold use ONE fixed α per network, taken from the normal training cases
only (never from test labels): the 99th percentile of the error map inside the lung of those cases, i.e. the α that
flags 1 % of healthy lung. CRF and morphology are the same for every row. Outside models (COVIDSeg, MedSAM2) are not
run. Writes ``ablation.md`` / ``ablation.json`` (IoU, Dice, precision, recall, FPR as mean (std) over cases, slice
AUROC) and each row's evaluation under ``rows/``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from ..checkpoint import load_checkpoint
from ..config import derive
from ..config import preset as make_preset
from ..detect import detect_volume
from ..errors import SACDiffError
from .evaluate import ALL_METRICS, evaluate
from ..atomic import Output
from ..data import case_path, healthy_cases, load_cases, optional_path
from ..progress import log, quiet_notes
from ..train import train

# (name, simplex, guidance, adaptive, ensemble)
ROWS = (
    ("DDPM", False, False, False, False),
    ("AnoDDPM", True, False, False, False),
    ("(a) DDPM + guidance", False, True, False, False),
    ("(b) DDPM + adaptive", False, False, True, False),
    ("(c) AnoDDPM + guidance", True, True, False, False),
    ("(d) simplex + adaptive", True, False, True, False),
    ("(e) guidance + adaptive", False, True, True, False),
    ("SAC-Diff w/o ensemble", True, True, True, False),
    ("SAC-Diff", True, True, True, True),
)
FIXED_PERCENTILE = 99.0


def model_name(simplex: bool, guidance: bool) -> str:
    return f"{'simplex' if simplex else 'gaussian'}-{'guided' if guidance else 'unguided'}"


def fixed_alpha(train_dir: Path, model, diffusion, cfg, device) -> float:
    """α that flags 1 % of the lung of the normal training cases (99th percentile of their error in the lung)."""
    values = []
    for name in healthy_cases(load_cases(train_dir)):
        result = detect_volume(case_path(train_dir, name, "ct"), model, diffusion, cfg,
                               optional_path(train_dir, name, "lung"), device)
        inside = result.lung[result.processed] > 0
        values.append(result.error[result.processed][inside])
    if not values:
        raise SACDiffError(f"no normal case in {train_dir} to calibrate the fixed threshold")
    return float(np.percentile(np.concatenate(values), FIXED_PERCENTILE))


def run_ablation(train_dir, cases_dir, out_dir, preset_name: str = "small", train_steps: Optional[int] = None,
                 models_dir=None, device="cpu", overwrite: bool = False,
                 detect_overrides: Optional[dict] = None) -> dict:
    train_dir, cases_dir, out_dir = Path(train_dir), Path(cases_dir), Path(out_dir)
    with Output(out_dir, "results", overwrite, inputs=[train_dir, cases_dir, models_dir]) as tmp:
        (tmp / "models").mkdir()
        checkpoints = {}
        for simplex in (False, True):
            for guidance in (False, True):
                name = model_name(simplex, guidance)
                given = Path(models_dir) / f"{name}.pt" if models_dir else None
                if given is not None and given.is_file():
                    checkpoints[name] = given
                    continue
                cfg = derive(make_preset(preset_name), diffusion={"noise": {"kind": "simplex" if simplex else "gaussian"}},
                             model={"conditional": guidance})
                log.info(f"training {name} ({preset_name} preset) on the normal cases of {train_dir}")
                path = tmp / "models" / f"{name}.pt"
                train(cfg, train_dir, path, device, steps=train_steps)
                checkpoints[name] = path
        rows, alphas = [], {}
        for label, simplex, guidance, adaptive, ensemble in ROWS:
            name = model_name(simplex, guidance)
            cfg, model, diffusion, _ = load_checkpoint(checkpoints[name], device)
            cfg = derive(cfg, detect=dict(detect_overrides or {}))
            cfg = derive(cfg, detect={"ensemble": cfg.detect.ensemble if ensemble else 1, "threshold": "adaptive"})
            if not adaptive:
                if name not in alphas:
                    alphas[name] = fixed_alpha(train_dir, model, diffusion, cfg, device)
                cfg = derive(cfg, detect={"threshold": "fixed", "fixed_threshold": alphas[name]})
            log.info(f"row {label}: {name}, threshold {cfg.detect.threshold}, K = {cfg.detect.ensemble}")
            slug = label.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "and").replace("/", "")
            with quiet_notes():  # the row is the note; its cases are not
                summary = evaluate(cases_dir, model, diffusion, cfg, tmp / "rows" / slug, device)
            rows.append({"config": label, "simplex": simplex, "guidance": guidance, "adaptive": adaptive,
                         "ensemble": cfg.detect.ensemble, "model": name,
                         "fixed_alpha": None if adaptive else alphas[name], "metrics": summary["mean_std"]})
        result = {"rows": rows, "preset": preset_name, "train": str(train_dir), "cases": str(cases_dir),
                  "fixed_threshold_rule": f"{FIXED_PERCENTILE:g}th percentile of the error inside the lung of the "
                                          "normal training cases (per network)"}
        (tmp / "ablation.json").write_text(json.dumps(result, indent=1, default=float), encoding="utf-8")
        (tmp / "ablation.md").write_text(ablation_markdown(result), encoding="utf-8")  # networks stay in RESULTS/models (--models)
    return result


def run_quick_ablation(out_dir, train_steps: Optional[int] = None, device="cpu", overwrite: bool = False,
                       detect_overrides: Optional[dict] = None) -> dict:
    """The whole table in about a minute (CI): tiny phantoms (2 COVID-like + 3 normal, 48², 10 slices), the tiny
    preset, 30 training steps, no CRF. Checks that every row runs; its figures say nothing about the method."""
    import shutil
    import tempfile

    from .phantom import write_phantom_cases

    data = Path(tempfile.mkdtemp(prefix="sacdiff-ablation-"))
    try:
        write_phantom_cases(data, cases=2, kind="covid", size=48, slices=10, seed=0, normals=3, overwrite=True)
        overrides = {"crf": False, **(detect_overrides or {})}
        return run_ablation(data, data, out_dir, "tiny", train_steps or 30, None, device, overwrite, overrides)
    finally:
        shutil.rmtree(data, ignore_errors=True)


def ablation_markdown(result: dict) -> str:
    tick = lambda b: "✓" if b else ""  # noqa: E731
    lines = ["| Config | Simplex Noise | Anatomy-Guidance | Background-Adaptive | Ensembling | "
             + " | ".join(ALL_METRICS) + " |", "|---|---|---|---|---|" + "---|" * len(ALL_METRICS)]
    for row in result["rows"]:
        cells = []
        for metric in ALL_METRICS:
            st = row["metrics"].get(metric)
            cells.append("" if st is None else f"{st['mean']:.4f} ({st['std']:.4f})")
        lines.append(f"| {row['config']} | {tick(row['simplex'])} | {tick(row['guidance'])} | {tick(row['adaptive'])} "
                     f"| {tick(row['ensemble'] > 1)} | " + " | ".join(cells) + " |")
    lines += ["", f"Preset `{result['preset']}`; trained on the normal cases of `{result['train']}`, tested on "
              f"`{result['cases']}`. Fixed threshold (rows without background-adaptive): "
              f"{result['fixed_threshold_rule']}. Mean (std) over cases; slice AUROC where slice labels exist."]
    return "\n".join(lines) + "\n"
