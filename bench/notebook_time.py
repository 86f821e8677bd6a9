"""How long the notebook tutorial takes, cell by cell, with its own parameters.

    python bench/notebook_time.py [--notebook notebooks/tutorial.ipynb] [--work /tmp/nb]

Runs the notebook with nbclient (pip install -e '.[notebook]') in --work (its RUN folder is
made there) and prints each code cell's seconds, the total and the machine's load before and
after; the executed copy is written to WORK/executed.ipynb to look at.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    import nbformat
    from nbclient import NotebookClient

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--notebook", default=str(ROOT / "notebooks" / "tutorial.ipynb"))
    ap.add_argument("--work", default="/tmp/ldmkit-notebook")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    nb = nbformat.read(args.notebook, as_version=4)
    times: list[tuple[int, float, str]] = []

    class Timed(NotebookClient):
        async def async_execute_cell(self, cell, cell_index, *a, **k):  # type: ignore[override]
            t = time.perf_counter()
            out = await super().async_execute_cell(cell, cell_index, *a, **k)
            if cell.cell_type == "code":
                first = cell.source.splitlines()[0][:60] if cell.source else ""
                times.append((cell_index, time.perf_counter() - t, first))
            return out

    print("load before:", " ".join(f"{x:.2f}" for x in os.getloadavg()))
    t0 = time.perf_counter()
    Timed(nb, timeout=1800, kernel_name="python3",
          resources={"metadata": {"path": str(work)}}).execute()  # fmt: skip
    total = time.perf_counter() - t0
    nbformat.write(nb, work / "executed.ipynb")
    for i, s, first in times:
        print(f"cell {i:2d} {s:7.1f} s  {first}")
    print(f"total {total:.1f} s = {total / 60:.2f} min")
    print("load after:", " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
