"""The ``sacdiff`` command line: demo, train, detect, threshold, evaluate, lungmask, phantom, benchmark.

Every user error exits with status 2 and one line naming the problem and the fix; Ctrl-C exits with 130 and
leaves no half-written output.
"""

from __future__ import annotations

import argparse
import signal
import json
import os
import sys
import time
from pathlib import Path
from typing import Literal, get_args, get_origin

from .allocator import keep_freed_memory
from .config import BackgroundRegion, NoiseKind, Precision, choices, derive
from .errors import Cancelled, SACDiffError
from .progress import for_terminal, show_notes
from .protocol import error_line


def _add_device(p):
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda (default: auto)")


def _bool_flag(p, name, default, help_text):
    p.add_argument(f"--{name}", dest=name.replace("-", "_"), action=argparse.BooleanOptionalAction,
                   default=default, help=help_text)


def _add_detect_option(p, option) -> None:
    """One ``config.DETECT_OPTIONS`` entry as an argparse option (dest = the DetectConfig field; default None =
    the model's own setting)."""
    from .config import detect_option_type

    kind = detect_option_type(option)
    if kind is bool:
        p.add_argument(option.flag, dest=option.field, action=argparse.BooleanOptionalAction, default=None,
                       help=option.help)
    elif get_origin(kind) is Literal:
        p.add_argument(option.flag, dest=option.field, choices=get_args(kind), help=option.help)
    else:
        p.add_argument(option.flag, dest=option.field, type=kind, help=option.help)


def _add_command_options(p, one_command_detect: bool) -> None:
    """The options of the detecting commands that are not detection settings: the lung mask's source and, for
    `detect` alone, the DICOM SEG output and torch.compile."""
    p.add_argument("--lung-method", choices=("classical", "learned"), default="classical",
                   help="automatic lung mask when none is given: classical (−320 HU threshold) or learned (SACDiff's "
                   "lung network: keeps consolidation and pleural masses inside; default: classical)")
    p.add_argument("--lung-model", help="lung network for --lung-method learned / --complete-lung (default: shipped)")
    p.add_argument("--complete-lung", action="store_true",
                   help="add to the given lung mask the lung network's parts it lacks that touch it (e.g. dense "
                   "consolidation a threshold mask cut out); the given mask is never reduced (default off)")
    if one_command_detect:
        p.add_argument("--dicom-seg", action="store_true",
                       help="also write the anomaly mask as a DICOM Segmentation (anomaly.seg.dcm) referencing the "
                       "CT's instances; the CT must be a DICOM series folder (needs highdicom: pip install "
                       "'sacdiff[dicom]')")
        p.add_argument("--compile", action="store_true",
                       help="torch.compile the network (CUDA graphs on GPU); pays off for long runs, falls back to "
                       "eager")


def _add_detect_options(p, one_command_detect: bool = False):
    """The detection options (``config.DETECT_OPTIONS``) with the command-only ones around them, in the order the
    help lists them; ``one_command_detect`` adds those only `detect` uses (the DICOM SEG output and torch.compile):
    an option a command would ignore is not offered there."""
    from .config import DETECT_OPTIONS, DETECT_PROFILES

    p.add_argument("--profile", choices=tuple(DETECT_PROFILES),
                   help="named settings on top of the model's (the options below still win): solid-lesions = a "
                   "second, deep chain for nodules and masses, α from the 5 mm shell, λ 16 — ≈ 1.5× the time "
                   "(Resources/results/map-candidates.md rounds 24–29)")
    for option in DETECT_OPTIONS:
        if option.field == "batch_size":
            _add_command_options(p, one_command_detect)
        _add_detect_option(p, option)
        if option.field == "error":
            p.add_argument("--noise", choices=choices(NoiseKind), help="override the model's noise family")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--progress", choices=("bar", "lines"), default="bar",
                   help="bar (terminal) or lines: 'SACDIFF_PROGRESS <fraction> <message>' on stdout (for the "
                   "Slicer module and other front ends)")
    _add_device(p)


def _load_for_detection(args):
    """The command's checkpoint and detection options → (cfg, model, diffusion, device)."""
    from .checkpoint import load_for_detection
    from .config import DETECT_PROFILES, detect_overrides
    from .distributed import resolve_device

    device = resolve_device(args.device)
    detect = {**DETECT_PROFILES.get(getattr(args, "profile", None), {}),  # a profile, the user's options over it
              **{k: v for k, v in detect_overrides(args).items() if k != "seed"}}  # the seed also seeds the noise
    cfg, model, diffusion = load_for_detection(
        args.model, device, seed=0 if args.seed is None else args.seed, noise_kind=args.noise, **detect)
    _refuse_inert_threshold_options(cfg.detect, args)
    return cfg, model, diffusion, device


def _refuse_inert_threshold_options(det, args) -> None:
    """An option that would change nothing is refused rather than printed and stored as if it had."""
    if det.threshold == "fixed" and args.lam is not None:
        raise SACDiffError("--lambda has no effect with a fixed threshold (α is --fixed-threshold); drop --lambda or "
                           "use --threshold adaptive")
    if det.threshold != "fixed" and args.fixed_threshold is not None:
        raise SACDiffError("--fixed-threshold is used only with --threshold fixed; add --threshold fixed or drop it")


def _lung_source(args):
    from .lung import LungSource

    if args.lung_model and args.lung_method != "learned" and not args.complete_lung:
        raise SACDiffError("--lung-model is used only with --lung-method learned or --complete-lung")
    return LungSource(args.lung_method, args.lung_model, args.complete_lung)


def _train_args(p):
    from .config import PRESETS

    p.add_argument("--data", required=True, help="folder with cases.json and ct/<case>_ct.nii.gz, ct/<case>_lung.nii.gz")
    p.add_argument("--out", required=True, help="checkpoint file to write (.pt)")
    p.add_argument("--preset", choices=PRESETS, help="network/grid preset (default: fast)")
    p.add_argument("--steps", type=int, help="optimisation steps (default: the preset's)")
    p.add_argument("--batch-size", type=int, help="slices per step and per process")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default 1e-4, cosine decay)")
    p.add_argument("--image-size", type=int, help="in-plane model grid (default: the preset's)")
    p.add_argument("--noise", choices=choices(NoiseKind), help="forward-process noise (default simplex)")
    _bool_flag(p, "conditional", None, "condition on the lung mask (default on; --no-conditional for baselines)")
    _bool_flag(p, "augment", None, "small rotations/scales/intensity jitter (default on)")
    p.add_argument("--timesteps", type=int, help="T (default: the preset's; paper 1000)")
    p.add_argument("--eight-bit", type=float, metavar="FRACTION",
                   help="share of training slices given as 8-bit lung-window JPEG pictures (default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, help="write the checkpoint every N steps")
    p.add_argument("--resume", help="continue from this checkpoint (its config is used)")
    p.add_argument("--init", help="warm start: initial weights from this checkpoint (same network shape)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing SACDiff checkpoint at --out")
    p.add_argument("--normal-cases", help="comma-separated cases to train on as healthy (default: every case whose "
                   "diagnosis is exactly 'normal')")
    p.add_argument("--include-uninfected-slices", action="store_true",
                   help="also train on slices of non-normal cases labelled 0 in slice_label_infection")
    _add_device(p)


def _detect_args(p):
    p.add_argument("ct", nargs="+",
                   help="CT volume (.nii.gz, .nrrd, .mha) or DICOM series folder, in HU; several, a folder of volumes "
                   "or a data folder (cases.json + ct/) run one after the other (under torchrun: shared over ranks) "
                   "into OUT/<scan>/ with OUT/summary.csv; <base>_lung.<ext> beside a scan is used as its lung mask")
    p.add_argument("--lung", help="lung mask on the CT grid (one scan only; default: automatic lung mask)")
    p.add_argument("--model", help="checkpoint from `sacdiff train` (default: the shipped reference model)")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    _add_detect_options(p, one_command_detect=True)


def _evaluate_args(p):
    p.add_argument("--cases", required=True, help="folder with cases.json and ct/ (like ../shared/data)")
    p.add_argument("--model", help="checkpoint from `sacdiff train` (default: the shipped reference model)")
    p.add_argument("--out", required=True, help="results folder (cases.csv, summary.json, summary.md, runs/)")
    p.add_argument("--sweep", help="accuracy against network evaluations: comma-separated K×n settings (K members, "
                   "n respaced reverse steps; n = 0: every step), e.g. 3x10,3x25,3x0 → OUT/<K>x<n>/ and OUT/sweep.md")
    _add_detect_options(p)


def _threshold_args(p):
    p.add_argument("run", help="output folder of `sacdiff detect`")
    p.add_argument("--lambda", dest="lam", type=float, required=True, help="new λ")
    _bool_flag(p, "crf", None, "dense CRF refinement (default: as the run)")


def _demo_args(p):
    p.add_argument("--out", default="sacdiff-demo", help="output folder (default ./sacdiff-demo, replaced)")
    p.add_argument("--ct", help="run on this CT instead of the synthetic chest (automatic lung mask)")
    p.add_argument("--lung-method", choices=("classical", "learned"), default="classical",
                   help="automatic lung mask for --ct: classical threshold or SACDiff's lung network")
    p.add_argument("--model", help="use this checkpoint (default: the shipped reference model)")
    p.add_argument("--train-steps", type=int, help="train the small demo model on synthetic normals for N steps "
                   "instead of using the shipped model (1500 gives the figures in the README)")
    p.add_argument("--steps", type=int, help="T_s of detection (default: the model's)")
    p.add_argument("--ensemble", type=int, help="K of detection (default: the model's)")
    p.add_argument("--sampling-steps", type=int, help="respaced reverse steps (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    _add_device(p)


def _phantom_args(p):
    p.add_argument("--out", required=True, help="folder to write (cases.json + ct/)")
    p.add_argument("--cases", type=int, default=3, help="number of cases of --kind")
    p.add_argument("--kind", choices=("covid", "ild", "normal"), default="covid")
    p.add_argument("--normals", type=int, default=0, help="extra healthy cases")
    p.add_argument("--size", type=int, default=128, help="in-plane pixels (32..1024)")
    p.add_argument("--slices", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")


def _validate_args(p):
    p.add_argument("--data", required=True, help="data folder whose normal cases trained the model")
    p.add_argument("--model", help="checkpoint (default: the shipped reference model)")
    p.add_argument("--out", required=True, help="results folder (validation.json, validation.md)")
    p.add_argument("--settings", help="comma-separated T_s×reverse steps×K, e.g. 100x10x3,150x10x3, each optionally "
                   "followed by h<N> (harmonised steps), r<R> (harmonisation radius) and s<R> (shift tolerance), e.g. "
                   "250x10x3h9r3s1 (default: the "
                   "model's own)")
    p.add_argument("--holdout-every", type=int, help="hold-out slab period (default: the checkpoint's; give it for a "
                   "model trained on everything, whose held-out slices were then seen in training)")
    p.add_argument("--normal-cases", help="comma-separated healthy cases (default: diagnosis exactly 'normal')")
    p.add_argument("--variants", help="also score the held-out slabs as other scanners would give them: comma-"
                   "separated noise (25 HU white noise), sharp (sharper kernel), thick (twice the slice thickness), "
                   "8bit (8-bit lung-window JPEG slices, like MedSeg), crop (cut to the lungs' bounding box, like "
                   "MedSeg)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    _add_device(p)


def _slim_args(p):
    p.add_argument("checkpoint", help="checkpoint from `sacdiff train` (or a lung network from `train-lungmask`)")
    p.add_argument("--out", required=True, help="file to write (.pt)")
    p.add_argument("--float32", action="store_true", help="keep float32 weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing SACDiff checkpoint")
    p.add_argument("--steps", type=int, help="set the model's default T_s (e.g. as `sacdiff validate` chose it)")
    p.add_argument("--sampling-steps", type=int, help="set the model's default respaced reverse steps")
    p.add_argument("--ensemble", type=int, help="set the model's default K")
    p.add_argument("--lambda", dest="lam", type=float, help="set the model's default λ")
    p.add_argument("--background", choices=choices(BackgroundRegion),
                   help="set the model's default region of α's background statistics")
    _bool_flag(p, "vessel-suppression", None, "set whether the model's detections suppress vessels in E by default")
    p.add_argument("--precision", choices=choices(Precision), help="set the model's default network arithmetic")
    p.add_argument("--deep-steps", type=int, help="set the model's default deep chain T_s (0 = none)")
    p.add_argument("--deep-sampling-steps", type=int, help="set the model's default deep chain respaced steps")
    p.add_argument("--deep-error-radius", type=int, help="set the model's default deep chain error radius")
    p.add_argument("--deep-opening", dest="deep_opening_mm", type=float,
                   help="set the model's default opening (mm) of the deep chain's map")


# The detection defaults `sacdiff slim` can set (DetectConfig fields; each is one of _slim_args's options)
SLIM_SETTINGS = ("steps", "sampling_steps", "ensemble", "lam", "background", "vessel_suppression", "precision",
                 "deep_steps", "deep_sampling_steps", "deep_error_radius", "deep_opening_mm")


def _ablation_args(p):
    from .config import PRESETS

    p.add_argument("--train", help="data folder whose normal cases train the networks (and calibrate fixed α)")
    p.add_argument("--cases", help="data folder with the labelled test cases (default: --train)")
    p.add_argument("--out", required=True, help="results folder (ablation.md, ablation.json, rows/, models/)")
    p.add_argument("--preset", choices=PRESETS, default="small", help="network preset (default: small)")
    p.add_argument("--train-steps", type=int, help="optimisation steps per network (default: the preset's)")
    p.add_argument("--models", help="folder with <noise>-<guidance>.pt checkpoints to reuse instead of training")
    p.add_argument("--steps", type=int, help="T_s of detection (default: the preset's)")
    p.add_argument("--sampling-steps", type=int, help="respaced reverse steps (default: the preset's)")
    p.add_argument("--quick", action="store_true",
                   help="tiny phantoms and the tiny preset, the whole table in about a minute (CI)")
    p.add_argument("--overwrite", action="store_true")
    _add_device(p)


def _benchmark_args(p):
    p.add_argument("--quick", action="store_true", help="small sizes (CI)")
    p.add_argument("--json", help="also write the figures to this JSON file (a new file, or with --overwrite one "
                   "SACDiff wrote)")
    p.add_argument("--overwrite", action="store_true", help="replace a JSON file an earlier benchmark wrote")
    _add_device(p)


def _lungmask_args(p):
    p.add_argument("ct", help="CT volume or DICOM folder, in HU")
    p.add_argument("--out", required=True, help="mask file to write (.nii.gz, .nrrd, .seg.nrrd)")
    _bool_flag(p, "exclude-airways", True, "leave the trachea and main bronchi out (default on)")
    p.add_argument("--method", choices=("classical", "learned"), default="classical",
                   help="classical: −320 HU threshold + components; learned: SACDiff's lung network, which keeps "
                   "consolidation and pleural masses inside (default: classical)")
    p.add_argument("--lung-model", help="lung network from `sacdiff train-lungmask` (default: the shipped one)")
    p.add_argument("--overwrite", action="store_true")


def _train_lungmask_args(p):
    p.add_argument("--data", required=True, help="folder with cases.json and ct/<case>_ct.nii.gz, ct/<case>_lung.nii.gz")
    p.add_argument("--out", required=True, help="lung network file to write (.pt)")
    p.add_argument("--steps", type=int, help="optimisation steps in all (default 3000; resuming: the run's own)")
    p.add_argument("--batch-size", type=int, default=8, help="slices per step (default 8)")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate, cosine decay (default 2e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, batches and synthetic pathology")
    p.add_argument("--cases", help="comma-separated healthy cases to train on (default: diagnosis mentions 'normal')")
    p.add_argument("--save-every", type=int, default=100, help="write the resumable state every N steps (default 100)")
    p.add_argument("--resume", help="continue this lung network's training (its settings are kept)")
    p.add_argument("--init", help="start from this lung network's weights (fresh optimiser and schedule)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing lung network file SACDiff wrote")
    p.add_argument("--progress", choices=("bar", "lines"), default="bar")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="sacdiff",
        description="SAC-Diff: unsupervised anomaly detection in chest CT with a lung-conditioned simplex diffusion "
        "model (Zheng et al., MIDL 2026).",
    )
    parser.add_argument("--version", action="version", version=f"sacdiff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, add_arguments, help_text) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text))
    return parser


def _progress(args, desc: str):
    return for_terminal(getattr(args, "progress", "bar"), desc)


def cmd_train(args) -> int:
    from .config import preset
    from .distributed import resolve_device
    from .train import train

    if args.resume:
        ignored = [f"--{n.replace('_', '-')}" for n in ("preset", "image_size", "noise", "timesteps", "batch_size",
                                                         "lr", "conditional", "augment", "init", "eight_bit")
                   if getattr(args, n, None) is not None]
        if ignored:
            raise SACDiffError(f"--resume continues with the checkpoint's own settings; {', '.join(ignored)} would be "
                               "ignored: drop them (or start a new training with --init to warm-start from it)")
    from .atomic import Output

    continuing = args.resume and Path(args.resume).resolve() == Path(args.out).resolve()
    if not continuing:  # --resume X --out X continues its own file
        Output(args.out, "checkpoint", args.overwrite, inputs=[args.data, args.init, args.resume])
    cfg = preset(args.preset or "fast")
    cfg = derive(
        cfg,
        train=dict(batch_size=args.batch_size, lr=args.lr, save_every=args.save_every, augment=args.augment,
                   seed=args.seed, eight_bit_fraction=args.eight_bit),
        preprocess=dict(image_size=args.image_size),
        diffusion=dict(noise={"kind": args.noise}, timesteps=args.timesteps or None),
        model=dict(conditional=args.conditional),
        detect=dict(steps=min(cfg.detect.steps, args.timesteps) if args.timesteps else None),
    )
    bar = _progress(args, "train") if int(os.environ.get("RANK", "0")) == 0 else None
    try:
        summary = train(cfg, args.data, args.out, resolve_device(args.device), resume=args.resume,
                        include_uninfected_slices=args.include_uninfected_slices, steps=args.steps, progress=bar,
                        normal_cases=args.normal_cases.split(",") if args.normal_cases else None, init=args.init)
    finally:
        if bar is not None:
            bar.close()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained {summary['steps']} steps on {summary['slices']} slices in {summary['seconds']:.1f} s; "
              f"final loss {summary['final_loss']:.4f}; checkpoint: {args.out}")
    return 0


def cmd_detect(args) -> int:
    from .batch import collect_scans, detect_many, is_volume_folder
    from .detect import detect_volume
    from .outputs import check_out_dir, write_run

    many = len(args.ct) > 1 or is_volume_folder(Path(args.ct[0]))
    if many and args.lung:
        raise SACDiffError("--lung names the mask of one scan; for several scans put <base>_lung.<ext> beside each")
    if many and args.dicom_seg:
        raise SACDiffError("--dicom-seg is for one DICOM series at a time; run each series on its own")
    if args.dicom_seg:
        from .dicomseg import check_source

        check_source(args.ct[0])  # before any work
    if many:
        lung_source = _lung_source(args)
        scans = collect_scans(args.ct)
        if int(os.environ.get("RANK", "0")) == 0:
            from .atomic import Output

            inputs = [s.ct for s in scans] + [s.lung for s in scans] + list(args.ct) + [args.model, args.lung_model]
            Output(args.out, "results", args.overwrite, inputs)  # checks only: each scan's run is written whole
        cfg, model, diffusion, device = _load_for_detection(args)
        bar = _progress(args, "detect")
        try:
            summary = detect_many(scans, model, diffusion, cfg, args.out, device, args.overwrite, bar,
                                  compile_model=args.compile, lung_source=lung_source)
        finally:
            bar.close()
        if summary is not None:
            print(f"{summary['ok']}/{len(scans)} scan(s) done on {summary['world_size']} process(es); "
                  f"runs and summary.csv in {args.out}")
            return 0 if summary["ok"] == len(scans) else 1
        return 0
    args.ct = args.ct[0]
    lung_source = _lung_source(args)
    if args.complete_lung and not args.lung:
        raise SACDiffError("--complete-lung completes a given lung mask: pass --lung, or use --lung-method learned")
    output = check_out_dir(args.out, args.overwrite, [args.ct, args.lung, args.model, args.lung_model])  # before work
    cfg, model, diffusion, device = _load_for_detection(args)
    d = cfg.detect
    bar = _progress(args, "detect")
    try:
        result = detect_volume(args.ct, model, diffusion, cfg, args.lung, device, bar, compile_model=args.compile,
                               lung_source=lung_source)
    finally:
        bar.close()
    extra = None
    if args.dicom_seg:
        from .dicomseg import SEG_FILE, write_dicom_seg

        def extra(folder):
            write_dicom_seg(result.mask, args.ct, folder / SEG_FILE, Path(args.model).name if args.model else
                            "shipped model", d.lam if d.threshold == "adaptive" else None)

    out = write_run(result, output, extra=extra)
    q = result.quantification
    print(f"anomaly: {q['anomaly_ml']:.1f} ml ({q['anomaly_percent_of_lung']:.2f} % of lung; right "
          f"{q['right_anomaly_percent']:.2f} %, left {q['left_anomaly_percent']:.2f} %), α = {result.threshold.alpha:.4g} "
          f"({'fixed' if d.threshold == 'fixed' else f'λ = {d.lam}'}); {result.facts['timings']['total_s']:.1f} s "
          f"on {device}; outputs in {out}")
    t = result.facts["timings"]
    print("time: " + ", ".join(f"{k[:-2].replace('_', ' ')} {v:.1f} s" for k, v in t.items() if k != "total_s"))
    return 0


def cmd_evaluate(args) -> int:
    from .atomic import Output
    from .experiments.evaluate import evaluate

    lung_source = _lung_source(args)
    from .data import load_cases

    Output(args.out, "results", args.overwrite, inputs=[args.cases, args.model, args.lung_model])  # before any work
    load_cases(args.cases)  # case names and descriptions checked before the model is read
    cfg, model, diffusion, device = _load_for_detection(args)
    bar = _progress(args, "evaluate")
    if args.sweep:
        from .experiments.evaluate import parse_sweep, sweep

        try:
            table = sweep(args.cases, model, diffusion, cfg, args.out, device, parse_sweep(args.sweep),
                          args.overwrite, bar, lung_source=lung_source)
        finally:
            bar.close()
        print(table)
        return 0
    try:
        summary = evaluate(args.cases, model, diffusion, cfg, args.out, device, args.overwrite, bar,
                           lung_source=lung_source)
    finally:
        bar.close()
    means = ", ".join(f"{k} {v:.4f}" for k, v in summary["mean"].items())
    print(f"{len(summary['cases'])} case(s); mean: {means or 'no labelled cases'}; results in {args.out}")
    return 0


def cmd_threshold(args) -> int:
    from .postprocess import rethreshold  # torch-free: no model runs
    from .outputs import load_run, write_threshold_update

    t0 = time.perf_counter()
    result = load_run(args.run)
    if result.detect.threshold == "fixed":
        raise SACDiffError(f"{args.run} was thresholded with a fixed α ({result.detect.fixed_threshold:g}); λ has no "
                           "effect there — run detect again with --threshold adaptive to use λ")
    before = int(result.mask.sum()) if result.mask is not None else 0
    rethreshold(result, args.lam, crf=args.crf)
    write_threshold_update(result, args.run)
    q = result.quantification
    print(f"λ = {args.lam}: α = {result.threshold.alpha:.4g}, anomaly {q['anomaly_ml']:.1f} ml "
          f"({before} → {int(result.mask.sum())} voxels) in {time.perf_counter() - t0:.2f} s; updated {args.run}")
    return 0


def cmd_lungmask(args) -> int:
    import numpy as np

    from . import io
    from .atomic import Output
    from .lung import segment_lungs
    from .postprocess import quantify

    io.check_writable_format(args.out)  # a .png would be one all-zero 2D slice, .xyz an ITK error after the work
    output = Output(args.out, "image", args.overwrite, inputs=[args.ct] + ([args.lung_model] if args.lung_model else []))
    ct = io.read_ct(args.ct)
    if args.method == "learned":
        from .lungnet import learned_lungs

        labels = learned_lungs(io.ct_array(ct), ct, args.lung_model, airways=not args.exclude_airways)
    else:
        labels = segment_lungs(io.ct_array(ct), ct, airways=not args.exclude_airways)
    with output as tmp:
        io.write_image(labels, ct, tmp)
    volumes = quantify(np.zeros_like(labels), labels, ct.GetSpacing())
    print(f"lung mask: right {volumes['right_lung_ml']:.0f} ml, left {volumes['left_lung_ml']:.0f} ml → {output.target}")
    return 0


def cmd_train_lungmask(args) -> int:
    from .lungnet import train_lungnet

    from .atomic import Output

    if not (0 <= args.seed < 2**63):
        raise SACDiffError("--seed must lie in 0 … 2⁶³−1")
    if args.resume and args.init:
        raise SACDiffError("train-lungmask: give --resume (continue a training) or --init (start from its weights), "
                           "not both")
    for flag, given in (("--resume", args.resume), ("--init", args.init)):
        if given and not Path(given).is_file():
            raise SACDiffError(f"train-lungmask: {flag} {given} does not exist; give a lung network file written by "
                               "`sacdiff train-lungmask`")
    if not (args.resume and Path(args.resume).resolve() == Path(args.out).resolve()):  # continuing in place is fine
        Output(args.out, "lung-model", args.overwrite, inputs=[args.data, args.resume, args.init])  # checks first
    bar = _progress(args, "train-lungmask")
    try:
        summary = train_lungnet(args.data, args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                seed=args.seed, resume=args.resume, init=args.init, save_every=args.save_every,
                                progress=bar,
                                cases=args.cases.split(",") if args.cases else None)
    finally:
        bar.close()
    print(f"lung network: {summary['steps']} steps on {summary['slices']} slices of {', '.join(summary['cases'])} "
          f"in {summary['seconds']:.0f} s; final loss {summary['final_loss']:.4f} → {args.out}")
    return 0


def cmd_demo(args) -> int:
    from .experiments.demo import run_demo
    from .lung import LungSource

    bar = _progress(args, "demo")
    try:
        summary = run_demo(args.out, args.ct, args.model, args.train_steps, args.seed, args.device, progress=bar,
                           detect_steps=args.steps, ensemble=args.ensemble, sampling_steps=args.sampling_steps,
                           lung_source=LungSource(args.lung_method))
    finally:
        bar.close()
    if "dice" in summary:
        print(f"Dice {summary['dice']:.3f}, IoU {summary['iou']:.3f}, slice AUROC {summary['slice_auroc']:.3f} "
              "against the phantom's true lesions")
    print(f"anomaly {summary['anomaly_ml']:.1f} ml; {summary['seconds']:.0f} s in all; outputs in {summary['run']}; "
          f"picture: {summary['overview']}")
    return 0


def cmd_phantom(args) -> int:
    from .experiments.phantom import write_phantom_cases

    out = write_phantom_cases(args.out, args.cases, args.kind, args.size, args.slices, args.seed, args.normals,
                              args.overwrite)
    print(f"wrote {args.cases} {args.kind} + {args.normals} normal synthetic case(s) to {out}")
    return 0


def cmd_ablation(args) -> int:
    from .atomic import Output
    from .distributed import resolve_device
    from .experiments.ablation import run_ablation, run_quick_ablation

    Output(args.out, "results", args.overwrite, inputs=[args.train, args.cases, args.models])
    overrides = {k: v for k, v in (("steps", args.steps), ("sampling_steps", args.sampling_steps)) if v is not None}
    if args.quick:
        result = run_quick_ablation(args.out, args.train_steps, resolve_device(args.device), args.overwrite,
                                    overrides)
    elif args.train is None:
        raise SACDiffError("give --train DIR (a data folder with normal cases) or --quick")
    else:
        result = run_ablation(args.train, args.cases or args.train, args.out, args.preset, args.train_steps,
                              args.models, resolve_device(args.device), args.overwrite, overrides)
    print((Path(args.out) / "ablation.md").read_text(encoding="utf-8"))
    return 0 if result["rows"] else 1


def cmd_validate(args) -> int:
    from .atomic import Output
    from .checkpoint import load_checkpoint, shipped_model_path
    from .distributed import resolve_device
    from .experiments.validate import VARIANTS, parse_settings, validate_settings, write_validation

    output = Output(args.out, "results", args.overwrite, inputs=[args.data, args.model])
    settings = parse_settings(args.settings)
    variants = tuple(v.strip() for v in args.variants.split(",")) if args.variants else ()
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SACDiffError(f"--variants {', '.join(unknown)} unknown; choose from {', '.join(VARIANTS)}")
    model_path = args.model or str(shipped_model_path())
    device = resolve_device(args.device)
    cfg, model, diffusion, _ = load_checkpoint(model_path, device, noise_seed=args.seed)
    every = args.holdout_every if args.holdout_every is not None else cfg.train.holdout_every
    if not every:
        raise SACDiffError(f"{model_path} was trained without a hold-out; give --holdout-every N (its held-out "
                           "slices were then seen in training: say so when you report the figures)")
    rows = validate_settings(args.data, model, diffusion, cfg, settings, device, every,
                             args.normal_cases.split(",") if args.normal_cases else None, seed=args.seed,
                             variants=variants)
    with output as tmp:
        print(write_validation(tmp, rows, model_path, every))
    return 0


def cmd_slim(args) -> int:
    from .atomic import Output
    from .checkpoint import load_checkpoint, slim_checkpoint
    from .lungnet import is_lungnet_file, slim_lungnet

    if is_lungnet_file(args.checkpoint):  # a lung network from `sacdiff train-lungmask`
        detect = [n for n in SLIM_SETTINGS if getattr(args, n) is not None]
        if detect:
            raise SACDiffError("a lung network has no detection settings; drop --steps/--sampling-steps/--ensemble/"
                               "--lambda/--background/--vessel-suppression/--precision/--deep-*")
        Output(args.out, "lung-model", args.overwrite, inputs=[args.checkpoint])
        out = slim_lungnet(args.checkpoint, args.out, half=not args.float32)
        print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
        return 0
    Output(args.out, "checkpoint", args.overwrite, inputs=[args.checkpoint])  # checks before any work
    detect = {n: getattr(args, n) for n in SLIM_SETTINGS if getattr(args, n) is not None}
    out = slim_checkpoint(args.checkpoint, args.out, half=not args.float32, detect=detect)
    load_checkpoint(out)  # the slim file passes the same checks as any checkpoint
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


def _calibrate_args(p):
    p.add_argument("--model", help="checkpoint to calibrate (default: the shipped reference model)")
    p.add_argument("--scans", required=True, nargs="+", help="the site's healthy CTs: files, DICOM folders or a "
                   "folder of volumes (a <base>_lung mask beside a scan is used, else the automatic one)")
    p.add_argument("--target", default="1%", help="largest %% of healthy lung λ may flag (default 1%%)")
    p.add_argument("--out", required=True, help="the calibrated copy of the model to write (.pt)")
    p.add_argument("--lung-method", choices=("classical", "learned"), default="classical",
                   help="automatic lung mask for scans without one (default: classical)")
    p.add_argument("--overwrite", action="store_true", help="replace a SACDiff checkpoint at --out")
    p.add_argument("--progress", choices=("bar", "lines"), default="bar")
    _add_device(p)


def _percent(text: str) -> float:
    try:
        value = float(str(text).strip().rstrip("%"))
    except ValueError:
        raise SACDiffError(f"--target {text!r} is not a percentage (e.g. 1%)") from None
    if not 0 < value <= 50:
        raise SACDiffError(f"--target {text} must lie in (0, 50] %")
    return value


def cmd_calibrate(args) -> int:
    from .atomic import Output
    from .batch import collect_scans
    from .calibrate import calibrate, write_calibrated
    from .checkpoint import load_checkpoint, load_for_detection, shipped_model_path
    from .distributed import resolve_device
    from .lung import LungSource

    target = _percent(args.target)
    model_path = Path(args.model) if args.model else shipped_model_path()
    scans = collect_scans(args.scans)
    output = Output(args.out, "checkpoint", args.overwrite, inputs=[model_path, *args.scans])  # before any work
    device = resolve_device(args.device)
    cfg, model, diffusion = load_for_detection(model_path, device)
    if cfg.detect.threshold != "adaptive":
        raise SACDiffError("the model uses a fixed threshold; λ calibration applies to the adaptive one only")
    bar = _progress(args, "calibrate")
    try:
        figures = calibrate(scans, model, diffusion, cfg, device, target,
                            lung_source=LungSource(args.lung_method), progress=bar)
    finally:
        bar.close()
    with output as tmp:
        write_calibrated(model_path, tmp, figures)
        load_checkpoint(tmp)  # the written file passes the same checks as any checkpoint, before it is put in place
    out = output.target
    for name, reason in figures["left_out"].items():
        print(f"left out {name}: not healthy-looking ({reason})")
    per_scan = ", ".join(f"{k} {v:.2f} %" for k, v in figures["per_scan_flagged_percent"].items())
    print(f"λ = {figures['lambda']:g} (was {figures['previous_lambda']:g}): {figures['pooled_flagged_percent']:.2f} % "
          f"of the healthy lung flagged (target ≤ {target:g} %; per scan: {per_scan}); wrote {out}")
    return 0


def _info_args(p):
    p.add_argument("--model", help="checkpoint (default: the shipped reference model)")


def model_info(model_path) -> dict:
    """What a front end shows about a model: its detection defaults and where its λ came from."""
    from .checkpoint import read_checkpoint, shipped_model_path
    from .config import from_dict

    path = Path(model_path) if model_path else shipped_model_path()
    payload = read_checkpoint(path)
    det = from_dict(payload["config"]).detect
    extra = payload.get("extra") or {}
    calibration = extra.get("calibration")
    if calibration:
        source = (f"calibrated on {len(calibration['per_scan_flagged_percent'])} healthy scan(s) of this site on "
                  f"{calibration['date'][:10]} ({calibration['pooled_flagged_percent']:.2f} % of their lung flagged, "
                  f"target ≤ {calibration['target_percent']:g} %)")
    else:
        source = "the model's own: chosen on the held-out healthy slices of its training scans (sacdiff validate)"
    return {"model": str(path), "lambda": det.lam, "lambda_source": source, "steps": det.steps,
            "sampling_steps": det.sampling_steps, "ensemble": det.ensemble, "threshold": det.threshold,
            "background": det.background, "vessel_suppression": det.vessel_suppression}


def cmd_info(args) -> int:
    print(json.dumps(model_info(args.model), ensure_ascii=False))
    return 0


def cmd_benchmark(args) -> int:
    from .atomic import Output, write_json
    from .experiments.benchmark import run_benchmark

    output = Output(args.json, "json", args.overwrite) if args.json else None  # before the work
    results = run_benchmark(args.device, args.quick)
    if output is not None:
        with output as tmp:
            write_json(tmp, results)
    return 0


# command → (what runs it, its options, its help line); the parser lists them in this order
COMMANDS = {
    "train": (cmd_train, _train_args,
                 "train a model on healthy CTs (Algorithm 1)"),
    "detect": (cmd_detect, _detect_args,
                 "detect anomalies in a CT (Algorithm 2 + Section 2.4)"),
    "evaluate": (cmd_evaluate, _evaluate_args,
                 "detect on every case of a data folder and score it (Tables 1–2)"),
    "threshold": (cmd_threshold, _threshold_args,
                 "re-binarise a finished run with another λ (no model run)"),
    "demo": (cmd_demo, _demo_args,
                 "the whole method on a synthetic chest in minutes (or on --ct)"),
    "phantom": (cmd_phantom, _phantom_args,
                 "write synthetic chest CTs with known lesions in the data-folder layout"),
    "validate": (cmd_validate, _validate_args,
                 "choose detection settings without lesion labels: held-out healthy slices, "
                 "%% of healthy lung flagged per λ, synthetic lesions"),
    "slim": (cmd_slim, _slim_args,
                 "a checkpoint for shipping: EMA weights in float16, no optimizer state"),
    "ablation": (cmd_ablation, _ablation_args,
                 "the generative rows of Tables 1–2: train 4 networks, evaluate 9 configs"),
    "benchmark": (cmd_benchmark, _benchmark_args,
                 "speed of noise and of one detection step, as ratios from one run"),
    "lungmask": (cmd_lungmask, _lungmask_args,
                 "automatic lung mask (threshold or the lung network), labels 1 right / 2 left"),
    "info": (cmd_info, _info_args,
                 "a model's detection defaults and where its λ came from, as JSON (for front ends)"),
    "calibrate": (cmd_calibrate, _calibrate_args,
                 "choose λ on a site's own healthy scans and write a calibrated copy of the model"),
    "train-lungmask": (cmd_train_lungmask, _train_lungmask_args,
                 "train SACDiff's pathology-inclusive lung network on healthy CTs"),
}


def main(argv=None) -> int:
    keep_freed_memory()  # every command, `python -m SACDiffLib` and the Slicer child process (allocator.py)
    for stream in (sys.stdout, sys.stderr):  # never crash on λ, α, ≥ under an ASCII locale
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    # the notes (progress.log): on stderr, beside the result lines; the demo's and benchmark's are their output
    show_notes("stdout" if args.command in ("demo", "benchmark") else "stderr")
    previous = _terminate_as_interrupt()
    try:
        return COMMANDS[args.command][0](args)
    except SACDiffError as exc:
        print(error_line(args.command, str(exc)), file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a quota, a name too long, a file that vanished: what the system said
        where = f" ({exc.filename})" if exc.filename else ""
        print(error_line(args.command, f"{exc.strerror or exc}{where}; nothing partial was left — free space, "
                                       "shorten the path or choose another --out"), file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Cancelled) as exc:
        if getattr(exc, "kept", None):
            print(f"sacdiff {args.command}: cancelled; {exc.kept}", file=sys.stderr)
        elif args.command in ("train", "train-lungmask") and Path(args.out).is_file():
            print(f"sacdiff {args.command}: stopped; the training state was saved to {args.out}: continue with "
                  f"`sacdiff {args.command} --data {args.data} --out {args.out} --resume {args.out}`", file=sys.stderr)
        else:
            print(f"sacdiff {args.command}: cancelled; no partial output was left", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _terminate_as_interrupt():
    """SIGTERM (a scheduler's or Slicer's cancel) takes the same clean-up path as Ctrl-C. Returns the previous
    handler (None where signals cannot be set, e.g. outside the main thread)."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return None


if __name__ == "__main__":
    sys.exit(main())
