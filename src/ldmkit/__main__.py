"""`python -m ldmkit ...`, and so `torchrun --standalone --nproc-per-node=N -m ldmkit train ...`."""

import sys

from .cli import main

sys.exit(main())
