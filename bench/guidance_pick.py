"""How stable is a run's own guidance choice? The quick measurement again, at several seeds.

    python bench/guidance_pick.py --run RUN [--settings 64x8,128x8,128x20] [--seeds 5]
                                  [--first-seed 0]

At the end of its training a conditional run measures FID and class accuracy at each guidance
scale on a few images (evaluation/guidance_choice.py: QUICK_N images per scale, QUICK_STEPS
sampler steps) and picks a scale (`pick_scale`: PRIOR_SCALE unless another is better beyond the
noise). This repeats that measurement on a finished run for --seeds seeds (of the real images
drawn and of the noise) at each NxSTEPS setting, with the run's quick reader trained again as
the run trained it (its seed, its step count), and prints each seed's pick under today's rule
and under the rule before it (the lowest FID, the most accurate within 10 % of it): a pick that
changes with the seed is a draw, not a measurement.
"""

from __future__ import annotations

import argparse
import math
import time

from benchlib import load_line, machine_line, print_table

from ldmkit.evaluation import feature_nets as fn
from ldmkit.evaluation.guidance_choice import GuidanceRow, measure_guidance, pick_scale
from ldmkit.pipeline import LatentDiffusion
from ldmkit.runs import RunFolder
from ldmkit.training.run import JUDGE_BUDGET_S, JUDGE_STEPS


def lowest_fid(rows: list[GuidanceRow], tie: float = 0.10) -> float:
    """The rule before issue 25's last step: the lowest FID, the most accurate within `tie`."""
    best = min(r.fid for r in rows)
    tied = [r for r in rows if r.fid <= best * (1 + tie)]
    return min(tied, key=lambda r: (-r.accuracy, r.scale)).scale


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a finished class- or text-conditional run")
    p.add_argument("--settings", default="64x8,128x8,128x20", help="images per scale x steps")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--first-seed", type=int, default=0, help="seeds from this one on")
    a = p.parse_args(argv)
    settings = [tuple(int(v) for v in s.split("x")) for s in a.settings.split(",")]
    print(machine_line())
    folder = RunFolder(a.run)
    ds = folder.load_data()
    per_epoch = math.ceil(len(ds) * (1 - fn.DOMAIN_HELD_OUT) / fn.DOMAIN_BATCH_SIZE)
    net = fn.get_feature_net("domain", dataset=ds, epochs=math.ceil(JUDGE_STEPS / per_epoch),
                             seed=folder.config().seed, time_budget_s=JUDGE_BUDGET_S)  # fmt: skip
    ldm = LatentDiffusion.from_run(a.run)
    rows = []
    for n, steps in settings:
        picks: dict[str, list[str]] = {"today": [], "before": []}
        t0 = time.perf_counter()
        for seed in range(a.first_seed, a.first_seed + a.seeds):
            choice = measure_guidance(ldm, folder, n=n, steps=steps, seed=seed, net=net)
            if choice is None:
                raise SystemExit(f"{a.run}: no guidance to measure (an unconditional run?)")
            print(f"  {n}x{steps} seed {seed}: " + ", ".join(
                f"{r.scale:g}: FID {r.fid:.2f} acc {r.accuracy:.3f}" for r in choice.rows
            ))  # fmt: skip
            picks["today"].append(f"{pick_scale(choice.rows, n=choice.n):g}")
            picks["before"].append(f"{lowest_fid(choice.rows):g}")
        seconds = (time.perf_counter() - t0) / a.seeds
        rows.append([f"{n}x{steps}", f"{seconds:.0f}", *(" ".join(v) for v in picks.values())])
    seeds = f"seeds {a.first_seed}-{a.first_seed + a.seeds - 1}"
    print_table(["images x steps", "s each", f"picks, {seeds}", "picks, rule before"], rows)
    print(load_line())


if __name__ == "__main__":
    main()
