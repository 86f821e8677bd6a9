"""Sample quality of the fast path: FID-cnn of a trained MNIST run, float32 against bf16 autocast.

    python bench/fast_path_quality.py --run runs/mnist [--n 1000] [--threads 1]

Both draw the same n images with the same seeds (the run's default sampler, one class per
tenth for a class-conditional run), judged by the domain classifier trained on the MNIST
training digits (cached in RUN/eval/) against 2n held-out test digits, beside the real-vs-real
floor. Prints the mean pixel change the fast path makes and, for scale, that of another seed.
"""

from __future__ import annotations

import argparse
import time

import torch
from benchlib import machine_line

from ldmkit.data import load_dataset
from ldmkit.evaluation.feature_nets import get_feature_net
from ldmkit.evaluation.reference import evaluate_samples, real_vs_real_floor, reference_features
from ldmkit.pipeline import LatentDiffusion
from ldmkit.runtime import tune_allocator


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a run trained on builtin:mnist")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    tune_allocator()
    print(machine_line())
    train = load_dataset("builtin:mnist", image_size=32)
    test = load_dataset("builtin:mnist?split=test", image_size=32, channels=train.images.shape[1])
    net = get_feature_net("domain", dataset=train, run_dir=a.run)
    ref = reference_features(test, net, n=2 * a.n, cache_dir=None)
    floor = real_vs_real_floor(ref, a.n)
    print(f"floor: FID {floor['FID']:.3f} precision {floor['precision']} recall {floor['recall']}")
    ldm = LatentDiffusion.from_run(a.run)
    labels = torch.arange(a.n) % ldm.conditioner.num_classes if ldm.conditioner.enabled else None
    images = {}
    for fast in (False, True):
        t0 = time.process_time()
        images[fast] = ldm.sample(a.n, class_labels=labels, fast=fast, seed=0)
        seconds = time.process_time() - t0
        m = evaluate_samples(images[fast], ref, net)
        print(f"fast={fast}: FID-cnn {m['FID']:.3f} precision {m['precision']:.3f} "
              f"recall {m['recall']:.3f}, sampling {seconds:.1f} CPU s")  # fmt: skip
    other = ldm.sample(64, class_labels=None if labels is None else labels[:64], fast=False, seed=1)
    print(f"mean |fast - float32| {(images[True] - images[False]).abs().mean():.4f}; "
          f"mean |seed 1 - seed 0| {(other - images[False][:64]).abs().mean():.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
