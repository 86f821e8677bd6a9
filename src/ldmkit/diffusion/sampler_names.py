"""The samplers' names, the default sampler and its step count: plain constants, without torch,
so that the command line's --help and the option declarations (`ldmkit.options`) can name them.
`samplers.SAMPLERS` maps the same names to the functions (a check there keeps them equal)."""

from __future__ import annotations

SAMPLER_NAMES = ("ddpm", "ddim", "euler", "heun", "dpm++2m", "dpm++2m-sde", "langevin", "lcm")

# The sampler `LatentDiffusion.sample`, `ldmkit sample`, the edits, the report and the training
# previews use unless told otherwise. On the default 10-minute shapes run (guidance 5, n = 300,
# FID on shapes-cnn features, seeds 0 and 1) DPM-Solver++(2M) SDE at 20 steps scored 6.38 / 8.88
# against 9.93 / 12.30 for the ODE solver at the same cost and 5.82 / 6.63 for the 1000-step
# DDPM chain: an imperfect model's errors are partly washed out by the fresh noise.
DEFAULT_SAMPLER = "dpm++2m-sde"
DEFAULT_STEPS = 20  # sampler steps, unless told otherwise
