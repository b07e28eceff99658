"""Detection over many scans: a list of files, a folder of volumes, or a data folder (cases.json + ct/).

Under ``torchrun`` every rank takes every WORLD_SIZE-th scan (on its own GPU when there are GPUs); rank 0 writes
one ``summary.csv`` when all ranks are done. Each scan gets its own run folder ``OUT/<scan>/``, written
all-or-nothing like a single ``sacdiff detect``; a scan that fails is reported in the summary and the others go
on.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .atomic import replaced_file
from .errors import Cancelled, SACDiffError
from .lung import LungSource
from .progress import Progress, log, part

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


@dataclass
class Scan:
    name: str
    ct: Path
    lung: Optional[Path]  # None: the automatic lung mask


def _strip(path: Path) -> str:
    name = path.name
    for suffix in VOLUME_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _sibling_lung(ct: Path) -> Optional[Path]:
    """``<base>_lung.<ext>`` beside ``<base>_ct.<ext>`` or ``<base>.<ext>``."""
    base = _strip(ct)
    base = base[:-3] if base.endswith("_ct") else base
    for suffix in VOLUME_SUFFIXES:
        candidate = ct.with_name(f"{base}_lung{suffix}")
        if candidate.is_file():
            return candidate
    return None


def is_volume_folder(path: Path) -> bool:
    """A folder of volume files or a data folder (not a DICOM series folder)."""
    path = Path(path)
    return path.is_dir() and ((path / "cases.json").is_file() or any(_volumes_in(path)))


def _volumes_in(folder: Path):
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name.endswith(VOLUME_SUFFIXES) and not _strip(p).endswith(("_lung", "_lesion")):
            yield p


def collect_scans(inputs) -> list[Scan]:
    """Scans named by ``inputs``: files, DICOM series folders, folders of volumes, or data folders."""
    scans: list[Scan] = []
    for item in map(Path, inputs):
        if not item.exists():
            raise SACDiffError(f"{item} does not exist; give CT files, DICOM folders or a folder of volumes")
        if item.is_dir() and (item / "cases.json").is_file():
            from .data import case_path, load_cases

            for case in load_cases(item):
                ct = case_path(item, case, "ct")
                lung = case_path(item, case, "lung")
                scans.append(Scan(case, ct, lung if lung.is_file() else None))
        elif item.is_dir() and any(_volumes_in(item)):
            scans += [Scan(_strip(p).removesuffix("_ct"), p, _sibling_lung(p)) for p in _volumes_in(item)]
        else:  # a CT file or a DICOM series folder
            scans.append(Scan(_strip(item).removesuffix("_ct") or item.name, item, _sibling_lung(item)
                              if item.is_file() else None))
    from .data import check_case_name

    for s in scans:
        check_case_name(s.name, str(s.ct))
    names = [s.name for s in scans]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SACDiffError(f"several scans would share the output folder name {duplicates}; rename them or run "
                           "them separately")
    if not scans:
        raise SACDiffError("no scans found in the inputs")
    return scans


def detect_many(scans: list[Scan], model, diffusion, cfg, out_dir, device, overwrite: bool = False,
                progress: Optional[Progress] = None,
                compile_model: bool = False, lung_source: LungSource = LungSource()) -> Optional[dict]:
    """Detect on this rank's share of ``scans``; rank 0 returns the summary (None on other ranks)."""
    from .detect import detect_volume
    from .atomic import mark
    from .outputs import check_out_dir, write_run
    from .distributed import Distributed

    dist = Distributed(device)
    out_dir = Path(out_dir)
    mine = scans[dist.rank :: dist.world]
    rows = []
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        mark(out_dir, "results")  # --overwrite may reuse it
        for i, scan in enumerate(mine):
            row = {"scan": scan.name, "ct": str(scan.ct), "lung": str(scan.lung) if scan.lung else "automatic",
                   "rank": dist.rank}
            try:
                result = detect_volume(scan.ct, model, diffusion, cfg, scan.lung, dist.device,
                                       part(progress, i, len(mine), scan.name),
                                       compile_model=compile_model, lung_source=lung_source)
                write_run(result, check_out_dir(out_dir / scan.name, overwrite, [scan.ct, scan.lung, lung_source.model]))
                q = result.quantification
                row.update(status="ok", anomaly_ml=round(q["anomaly_ml"], 3),
                           anomaly_percent_of_lung=round(q["anomaly_percent_of_lung"], 4),
                           right_anomaly_percent=round(q["right_anomaly_percent"], 4),
                           left_anomaly_percent=round(q["left_anomaly_percent"], 4),
                           alpha=result.threshold.alpha, seconds=result.facts["timings"]["total_s"])
            except (Cancelled, KeyboardInterrupt):
                if dist.active:
                    raise
                # Each finished scan is its own complete run; keep them and say so in summary.csv and the message.
                done = len(rows)
                rows += [{"scan": s.name, "ct": str(s.ct), "status": "cancelled", "rank": dist.rank}
                         for s in mine[done:]]
                _write_summary(rows, out_dir / "summary.csv")
                raise Cancelled("batch cancelled", kept=(
                    f"{done} of {len(mine)} scan(s) finished and kept, each a complete run in {out_dir}; summary.csv "
                    "lists them and the cancelled ones; nothing partial was left")) from None
            except SACDiffError as exc:
                row.update(status=f"error: {exc}")
                log.info(f"{scan.name}: {exc}")
            rows.append(row)
        (out_dir / f".rank{dist.rank}.json").write_text(json.dumps(rows), encoding="utf-8")
        if dist.active:
            import torch.distributed as td

            td.barrier()
        if not dist.main:
            return None
        every = []
        for rank in range(dist.world):
            share = out_dir / f".rank{rank}.json"
            every += json.loads(share.read_text(encoding="utf-8"))
            share.unlink()
        order = {s.name: i for i, s in enumerate(scans)}
        every.sort(key=lambda r: order[r["scan"]])
        _write_summary(every, out_dir / "summary.csv")
        return {"scans": every, "ok": sum(r["status"] == "ok" for r in every), "world_size": dist.world}
    finally:
        dist.close()


def _write_summary(rows: list[dict], path: Path) -> None:
    fields = ["scan", "status", "anomaly_ml", "anomaly_percent_of_lung", "right_anomaly_percent",
              "left_anomaly_percent", "alpha", "seconds", "rank", "ct", "lung"]
    with replaced_file(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
