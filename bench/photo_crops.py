"""The photo data of the README's restoration pictures: 32x32 crops of five scikit-image
sample photos (offline, inside the scikit-image wheel: `pip install scikit-image`), and the
held-out astronaut at 96x96.

    python bench/photo_crops.py --out photos --holdout astronaut96.png
    ldmkit train --data photos --out runs/photos --set conditioning=none \
        --set vae_train.steps=400 --set unet_train.steps=1800
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("coffee", "chelsea", "rocket", "hubble_deep_field", "retina")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the crops")
    p.add_argument("--holdout", type=Path, help="where to write the 96x96 astronaut")
    p.add_argument("--per-scale", type=int, default=300)
    args = p.parse_args()
    import skimage.data as sd

    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    k = 0
    for name in PHOTOS:
        im = Image.fromarray(getattr(sd, name)())
        for short in (96, 128, 192):  # three scales of each photo
            w, h = im.size
            s = short / min(w, h)
            small = np.asarray(im.resize((round(w * s), round(h * s)), Image.LANCZOS))
            for _ in range(args.per_scale):
                y = rng.integers(0, small.shape[0] - 32 + 1)
                x = rng.integers(0, small.shape[1] - 32 + 1)
                Image.fromarray(small[y : y + 32, x : x + 32]).save(args.out / f"{k:05d}.png")
                k += 1
    print(f"wrote {k} crops to {args.out}")
    if args.holdout:
        Image.fromarray(sd.astronaut()).resize((96, 96), Image.LANCZOS).save(args.holdout)
        print(f"wrote {args.holdout}")


if __name__ == "__main__":
    main()
