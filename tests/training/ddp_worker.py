"""`ldmkit ARGS` as one torchrun process, for tests/training/test_distributed.py.

Records every write this process makes under the folder LDMKIT_TEST_WATCH (a Python audit hook:
files opened for writing, folders made, renames, removals) into LDMKIT_TEST_REPORT/rank<r>.txt,
line by line as they happen (ldmkit's CLI ends a torchrun process with os._exit), so a test can
check that only rank 0 writes. LDMKIT_TEST_FAIL_RANK=r makes rank r fail while it prepares the
run (a fault only that rank meets).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
WRITE_EVENTS = ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.chmod")


def main() -> int:
    rank = os.environ["RANK"]
    watch = Path(os.environ["LDMKIT_TEST_WATCH"]).resolve()
    report = open(Path(os.environ["LDMKIT_TEST_REPORT"]) / f"rank{rank}.txt", "w")

    def record(line: str) -> None:
        report.write(line + "\n")
        report.flush()

    def under_watch(path: object) -> str | None:
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not isinstance(path, (str, os.PathLike)):
            return None  # a file descriptor
        p = Path(path).absolute()
        return str(p) if p == watch or watch in p.parents else None

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = any(c in (mode or "") for c in "wax+") or bool((flags or 0) & WRITE_FLAGS)
            if writing and (p := under_watch(path)):
                record(f"open {p}")
        elif event == "os.rename" and (under_watch(args[0]) or under_watch(args[1])):
            record(f"{event} {args[0]} -> {args[1]}")
        elif event in WRITE_EVENTS and args and (p := under_watch(args[0])):
            record(f"{event} {p}")

    sys.addaudithook(hook)
    if os.environ.get("LDMKIT_TEST_FAIL_RANK") == rank:
        import ldmkit.training.run as run

        def fault(*args: object) -> None:
            raise ValueError(f"an injected fault on rank {rank}")

        run._sanity_check = fault
    from ldmkit.cli import main as ldmkit_main

    return ldmkit_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
