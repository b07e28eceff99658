"""Pictures of where the learned lung mask does worst (Resources/results/lungmask-worst.png): the four MedSeg slices
with the least infection inside the learned mask. Green: the radiologists' infection; red: the learned lung mask;
blue: the classical threshold mask. Run from the repository root beside ../shared/data:

    python Resources/results/render_lungmask_worst.py Resources/results/lungmask-figures.json
"""

import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image
from scipy import ndimage

from SACDiffLib.experiments.medseg import SPACING_MM, read_slice
from SACDiffLib.lung import segment_lungs
from SACDiffLib.lungnet import learned_lungs

FOLDER = Path("../shared/data/slices/medseg_covid")


def outline(mask: np.ndarray) -> np.ndarray:
    return mask ^ ndimage.binary_erosion(mask)


def main(figures_json: str, out: str = "Resources/results/lungmask-worst.png") -> None:
    rows = json.loads(Path(figures_json).read_text())["medseg"]["per_slice"]
    worst = sorted((r for r in rows if r["truth_pixels"]), key=lambda r: r["learned"])[:4]
    tiles = []
    for r in worst:
        hu, truth, _ = read_slice(FOLDER / "image" / f"{r['slice']}.jpg", FOLDER / "mask" / f"{r['slice']}.png")
        image = sitk.GetImageFromArray(hu)
        image.SetSpacing(SPACING_MM)
        learned, classical = learned_lungs(hu, image)[0] > 0, segment_lungs(hu, image, cropped=True)[0] > 0
        grey = (np.clip((hu[0] + 1024) / 1424, 0, 1) * 255).astype(np.uint8)
        rgb = np.stack([grey] * 3, -1)
        rgb[outline(truth[0])] = (0, 220, 0)
        rgb[outline(classical)] = (60, 120, 255)
        rgb[outline(learned)] = (255, 40, 40)
        tiles.append(np.asarray(Image.fromarray(rgb).resize((320, 320))))
    Image.fromarray(np.concatenate(tiles, 1)).save(out)
    print(f"{out}: slices {[r['slice'] for r in worst]} (infection inside learned / classical: "
          f"{[(round(r['learned']), round(r['classical'])) for r in worst]} %)")


if __name__ == "__main__":
    main(*sys.argv[1:])
