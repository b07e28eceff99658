"""Shared fixtures: small synthetic chest volumes on disk, a data folder in the shared layout, a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

needs_shared_data = pytest.mark.skipif(
    not (SHARED_DATA / "cases.json").exists(),
    reason=f"real CT data not found at {SHARED_DATA} (only present beside a development checkout)",
)


def make_chest(size=64, slices=12, seed=0, lesion=False, spacing=(1.5, 1.5, 2.5)):
    """A crude chest: air outside, a soft-tissue body ellipse, two lung ellipses (−850 HU) with a few vessels,
    noise; optionally a ground-glass blob in the right lung. Returns (hu, lung labels 1 right/2 left, lesion)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[0:slices, 0:size, 0:size].astype(np.float32)
    cy, cx = size / 2, size / 2
    body = ((y - cy) / (0.38 * size)) ** 2 + ((x - cx) / (0.46 * size)) ** 2 <= 1
    # Index x grows towards the patient's left (LPS, identity direction): the right lung is at small x.
    right = ((y - cy) / (0.27 * size)) ** 2 + ((x - 0.31 * size) / (0.13 * size)) ** 2 <= 1
    left = ((y - cy) / (0.27 * size)) ** 2 + ((x - 0.69 * size) / (0.13 * size)) ** 2 <= 1
    taper = (z >= 1) & (z <= slices - 2)
    right, left = right & taper, left & taper
    hu = np.full(x.shape, -1000.0, np.float32)
    hu[body] = 40.0
    hu[right | left] = -850.0
    for _ in range(6):  # vessels
        vy, vx = rng.uniform(0.3, 0.7) * size, rng.uniform(0.2, 0.8) * size
        hu[((y - vy) ** 2 + (x - vx) ** 2 <= 2.0) & (right | left)] = 30.0
    les = np.zeros(x.shape, bool)
    if lesion:
        les = ((y - cy) ** 2 + (x - 0.31 * size) ** 2 + ((z - slices / 2) * 2) ** 2 <= (0.07 * size) ** 2) & right
        hu[les] = -450.0
    hu += rng.normal(0, 15, hu.shape).astype(np.float32)
    labels = np.zeros(x.shape, np.uint8)
    labels[right] = 1
    labels[left] = 2
    return hu, labels, les.astype(np.uint8)


def to_image(array, spacing=(1.5, 1.5, 2.5), origin=(-48.0, -48.0, 0.0), dtype=None):
    image = sitk.GetImageFromArray(array if dtype is None else array.astype(dtype))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def write_case(folder: Path, name: str, seed: int, lesion=False, size=64, slices=12):
    hu, labels, les = make_chest(size, slices, seed, lesion)
    (folder / "ct").mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(to_image(hu, dtype=np.int16), str(folder / "ct" / f"{name}_ct.nii.gz"))
    sitk.WriteImage(to_image((labels > 0).astype(np.uint8)), str(folder / "ct" / f"{name}_lung.nii.gz"))
    if lesion:
        sitk.WriteImage(to_image(les), str(folder / "ct" / f"{name}_lesion.nii.gz"))
    return hu, labels, les


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """Two normal synthetic cases and one with a lesion, laid out like ../shared/data."""
    folder = tmp_path_factory.mktemp("data")
    write_case(folder, "normal_a", 1)
    write_case(folder, "normal_b", 2)
    write_case(folder, "sick", 3, lesion=True)
    cases = {
        "normal_a": {"diagnosis": "normal"},
        "normal_b": {"diagnosis": "normal"},
        "sick": {"diagnosis": "covid19", "slice_label_infection": [0] * 4 + [1] * 4 + [0] * 4},
    }
    (folder / "cases.json").write_text(json.dumps(cases))
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(data_dir, tmp_path_factory) -> Path:
    from SACDiffLib.config import derive, preset
    from SACDiffLib.train import train

    cfg = derive(preset("tiny"), train={"steps": 6})
    out = tmp_path_factory.mktemp("model") / "tiny.pt"
    train(cfg, data_dir, out)
    return out


def write_dicom_series(volume, folder):
    """A DICOM series of ``volume`` (GDCM's writer; it sets the C locale to "C", put back here as SACDiff's reader
    does, so that later tests write text as before)."""
    import locale

    saved = locale.setlocale(locale.LC_CTYPE)
    try:
        return _write_dicom_files(volume, folder)
    finally:
        locale.setlocale(locale.LC_CTYPE, saved)


def _write_dicom_files(volume, folder):
    folder.mkdir()
    series = "1.2.826.0.1.3680043.2.1125.1.1"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()  # keep our series UID instead of one per file
    for z in range(volume.GetDepth()):
        sl = volume[:, :, z]
        for tag, value in {
            "0008|0060": "CT", "0020|000e": series, "0020|000d": series + ".9", "0020|0013": str(z + 1),
            "0020|0032": "\\".join(map(str, volume.TransformIndexToPhysicalPoint((0, 0, z)))),
            "0020|0037": "1\\0\\0\\0\\1\\0", "0028|0030": "1.5\\1.5", "0018|0050": "2.5",
            "0020|0052": series + ".7", "0010|0020": "PHANTOM", "0010|0010": "Phantom^Chest", "0020|0010": "1",
            "0008|0020": "20260101", "0008|0030": "120000", "0008|0050": "1", "0008|0090": "",
            "0010|0030": "", "0010|0040": "O", "0020|0011": "1",
        }.items():
            sl.SetMetaData(tag, value)
        sl.SetMetaData("0008|0018", f"{series}.{z + 1}")
        writer.SetFileName(str(folder / f"{z:03d}.dcm"))
        writer.Execute(sl)
    return folder


def free_port() -> str:
    """A TCP port free on this machine now, for a torchrun rendezvous (a fixed one can be held by another run)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])
