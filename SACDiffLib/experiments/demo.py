"""``sacdiff demo``: the whole method, offline, in minutes on a CPU.

Detects lesions in a synthetic COVID-like chest (``phantom.py``, known truth) with the shipped reference model
(``Resources/models``, trained on real normal CTs) at its fast settings, and reports Dice / IoU / slice AUROC
against the truth. With ``--ct`` it runs on a real scan instead (lung mask from the fallback). ``--train-steps N``
(or a missing shipped model) trains the small ``demo`` preset on synthetic healthy chests first, the way a site
would train its own model.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Optional

import SimpleITK as sitk

from ..lung import LungSource
from ..checkpoint import load_checkpoint, shipped_model_path
from ..config import derive, preset
from ..detect import detect_volume
from ..distributed import resolve_device
from ..errors import SACDiffError
from .evaluate import score_case
from ..outputs import write_overview, write_run
from ..progress import Progress, log, part
from ..atomic import Output
from ..data import case_path
from .phantom import write_phantom_cases
from ..train import train


def run_demo(
    out_dir="sacdiff-demo",
    ct: Optional[str] = None,
    model: Optional[str] = None,
    train_steps: Optional[int] = None,
    seed: int = 0,
    device: str = "auto",
    overwrite: bool = True,
    progress: Optional[Progress] = None,
    detect_steps: Optional[int] = None,
    ensemble: Optional[int] = None,
    sampling_steps: Optional[int] = None,
    lung_source: LungSource = LungSource(),
) -> dict:
    final = Path(out_dir)
    # The whole demo folder is built under a temporary name and put in place at the end (atomic.Output).
    with Output(final, "results", overwrite, inputs=[ct, model]) as out_dir:
        dev = resolve_device(device)
        data = out_dir / "data"
        t0 = time.perf_counter()
        if model is None and train_steps is None:
            try:
                model = shipped_model_path()
                log.info(f"[1/3] model: the shipped reference model {model}")
            except SACDiffError as exc:
                log.info(f"[1/3] {exc}; training the small demo model instead")
        size = 128
        if model is None:
            size = 96
            log.info(f"[1/3] synthetic healthy chests for training → {data}")
            write_phantom_cases(data, cases=1, kind="covid", size=size, slices=24, seed=seed, normals=4, overwrite=True)
            cfg = derive(preset("demo"), train={"seed": seed})
            model = out_dir / "demo-model.pt"
            log.info(f"[2/3] training the small 'demo' model on CPU/GPU ({train_steps or cfg.train.steps} steps) "
                     f"→ {model}")
            summary = train(cfg, data, model, dev, steps=train_steps, progress=part(progress, 0, 2, "train"))
            progress = part(progress, 1, 2, "detect")  # the bar's second half
            log.info(f"      final loss {summary['final_loss']:.4f} after {summary['seconds']:.0f} s")
        cfg, net, diffusion, _ = load_checkpoint(model, dev, noise_seed=seed)
        cfg = derive(cfg, detect={"seed": seed, "steps": detect_steps, "ensemble": ensemble,
                                  "sampling_steps": sampling_steps})
        if ct is None:
            case = "phantom_covid_000"
            if not case_path(data, case, "ct").exists():
                log.info(f"[2/3] a synthetic COVID-like chest ({size}², 24 slices) with known lesions → {data}")
                write_phantom_cases(data, cases=1, kind="covid", size=size, slices=24, seed=seed, overwrite=True)
            ct_path, lung_path = case_path(data, case, "ct"), case_path(data, case, "lung")
            truth_path = case_path(data, case, "lesion")
        else:
            ct_path, lung_path, truth_path = Path(ct), None, None
        log.info(f"[3/3] detecting anomalies in {ct_path} (T_s={cfg.detect.steps}, K={cfg.detect.ensemble}, "
                 f"{cfg.detect.sampling_steps or cfg.detect.steps} reverse steps)")
        result = detect_volume(ct_path, net, diffusion, cfg, lung_path, dev, progress, lung_source=lung_source)
        run_dir = write_run(result, out_dir / "run", overwrite=overwrite)
        summary = {"run": str(run_dir), "model": str(model), "seconds": time.perf_counter() - t0,
                   "anomaly_ml": result.quantification["anomaly_ml"]}
        if truth_path is not None:
            truth = sitk.GetArrayFromImage(sitk.ReadImage(str(truth_path))) > 0
            # Scored exactly as `sacdiff evaluate` scores a case (voxel metrics in the lung, slice AUROC over all slices
            # with the per-slice anomaly volume as score).
            scores = score_case(result, truth, truth.reshape(truth.shape[0], -1).any(1).astype(int).tolist())
            summary.update({k: scores[k] for k in ("dice", "iou", "slice_auroc")})
            write_overview(result, run_dir / "overview.png", truth=truth)
        overview = out_dir / "overview.png"
        shutil.copyfile(run_dir / "overview.png", overview)
        summary["overview"] = str(overview)
        for key in ("run", "overview"):
            summary[key] = str(final / Path(summary[key]).relative_to(out_dir))
        if str(summary.get("model", "")).startswith(str(out_dir)):
            summary["model"] = str(final / Path(summary["model"]).relative_to(out_dir))
    return summary
