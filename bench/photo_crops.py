"""Colour photographs that ship offline, cut into square crops: the photo data of the README's
restoration pictures and of the 64 / 128 px benchmark (issue 26).

The photos come inside packages (no download): scikit-image's sample photos (`pip install
scikit-image`), scikit-learn's two (china, flower) and matplotlib's grace_hopper. Each photo is
resized so its short side is each of a few scales, and random crops of `--size` px are cut from
it (never upscaled past the photo's own resolution). With `--classes` every photo's crops go
into a sub-folder named after it, so a run learns one class per photo (and its domain
classifier, which measures readability and FID-cnn, tells the photos apart).

    # the restoration pictures: 32x32 crops of five photos, and the held-out astronaut
    python bench/photo_crops.py --out photos --holdout astronaut96.png
    # the 64 px benchmark: 11 photos x 4 scales x 250 crops, one class per photo
    python bench/photo_crops.py --out photos64 --size 64 --photos all --classes --per-scale 250
    # held-out crops for `ldmkit eval --held-out` (the same photos, other places)
    python bench/photo_crops.py --out photos64-test --size 64 --photos all --classes --per-scale 50 --seed 1
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("coffee", "chelsea", "rocket", "hubble_deep_field", "retina")
# every distinct colour photo found offline (scikit-image's cat is chelsea; colorwheel and logo
# are drawings): scikit-image, scikit-learn and matplotlib sample data
ALL_PHOTOS = (*PHOTOS, "astronaut", "immunohistochemistry", "stereo_motorcycle", "china",
              "flower", "grace_hopper")  # fmt: skip


def load_photo(name: str) -> Image.Image:
    """One photo as an RGB PIL image, from the package that ships it."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_images

        data = load_sample_images()
        index = [Path(f).stem for f in data.filenames].index(name)
        return Image.fromarray(data.images[index])
    if name == "grace_hopper":
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
            return Image.open(f).convert("RGB")
    import skimage.data as sd

    pixels = getattr(sd, name)()
    if isinstance(pixels, tuple):  # stereo_motorcycle: (left, right, disparity)
        pixels = pixels[0]
    return Image.fromarray(pixels).convert("RGB")


def scales(size: int) -> tuple[int, ...]:
    """Short sides the photos are resized to before cropping: 1.5x to 4x the crop."""
    return tuple(round(size * k) for k in (1.5, 2, 3, 4))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the crops")
    p.add_argument("--holdout", type=Path, help="where to write the 96x96 astronaut")
    p.add_argument("--size", type=int, default=32, help="crop side in px")
    p.add_argument("--per-scale", type=int, default=300, help="crops per photo and scale")
    p.add_argument("--photos", choices=["five", "all"], default="five",
                   help=f"five: {', '.join(PHOTOS)}; all: also {', '.join(ALL_PHOTOS[5:])}")  # fmt: skip
    p.add_argument("--classes", action="store_true", help="one sub-folder (class) per photo")
    p.add_argument("--seed", type=int, default=0, help="another seed: other crops (held-out data)")
    args = p.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    k = 0
    names = PHOTOS if args.photos == "five" else ALL_PHOTOS
    # the five-photo 32 px set keeps its original scales (the README's restoration pictures)
    shorts = (96, 128, 192) if args.photos == "five" and args.size == 32 else scales(args.size)
    for name in names:
        im = load_photo(name)
        folder = args.out / name if args.classes else args.out
        folder.mkdir(exist_ok=True)
        for short in shorts:
            w, h = im.size
            s = min(1.0, short / min(w, h))  # never enlarged past the photo's resolution
            small = np.asarray(im.resize((round(w * s), round(h * s)), Image.LANCZOS))
            n = args.size
            for _ in range(args.per_scale):
                y = rng.integers(0, small.shape[0] - n + 1)
                x = rng.integers(0, small.shape[1] - n + 1)
                Image.fromarray(small[y : y + n, x : x + n]).save(folder / f"{k:05d}.png")
                k += 1
    print(f"wrote {k} crops of {args.size}x{args.size} from {len(names)} photos to {args.out}")
    if args.holdout:
        import skimage.data as sd

        Image.fromarray(sd.astronaut()).resize((96, 96), Image.LANCZOS).save(args.holdout)
        print(f"wrote {args.holdout}")


if __name__ == "__main__":
    main()
