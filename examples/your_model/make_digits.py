"""Write scikit-learn's embedded digits as PNG folders: ``OUT/train/<digit>/*.png``, ``OUT/test/<digit>/*.png``
and ``OUT/odd/*.png`` (inverted test digits: images the classifier never saw the like of).

    python examples/your_model/make_digits.py digits/
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from covguard.data.digits import load_digits_split


def write_digits(out: str | Path, *, seed: int = 0) -> Path:
    """Write the train (train + validation) and test splits of :func:`load_digits_split` (16x16) as PNG files."""
    out = Path(out)
    split = load_digits_split(size=16, seed=seed)
    sets = {"train": [split.train, split.val], "test": [split.test]}
    for name, parts in sets.items():
        i = 0
        for part in parts:
            for x, y in zip(*part.tensors):
                folder = out / name / split.classes[int(y)]
                folder.mkdir(parents=True, exist_ok=True)
                pixels = (x[0].numpy() * 255).round().astype(np.uint8)  # (16, 16)
                Image.fromarray(pixels, "L").save(folder / f"{i:04d}.png")
                if name == "test":
                    (out / "odd").mkdir(exist_ok=True)
                    Image.fromarray(255 - pixels, "L").save(out / "odd" / f"inverted-{i:04d}.png")
                i += 1
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to write")
    write_digits(parser.parse_args().out)
