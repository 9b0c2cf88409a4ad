"""The hostile datasite of the flood benchmark: junk result files, written as fast as possible.

Runs as its own process, started by bench_flood.py, so that the flood competes
with the daemon for the CPUs as another program would, and does not share a GIL
with the thread of the benchmark that reads the daemon's log.

    junk_writer.py RESULTS_DIR COUNT SEED

Makes COUNT junk payloads (random bytes, 200 to 1000 of them) and names
(``<32 hex>.result``) from SEED, so that every run refuses the same mix of
files. Prints ``ready``, waits for one line on stdin, then writes each file
under a hidden temp name (which the daemon ignores) and renames it into
RESULTS_DIR, without pausing. Ends by printing one JSON line: the names, the
``time.time()`` taken just before each rename, and when writing began and ended.
Standard library only, so that it is ready fast.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time

SMALLEST_JUNK_BYTES = 200
LARGEST_JUNK_BYTES = 1000
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


def junk(count: int, seed: int) -> list[tuple[str, bytes]]:
    """COUNT (name, payload) pairs, the same for the same seed."""
    rng = random.Random(seed)
    return [
        (
            f"{rng.getrandbits(128):032x}.result",
            rng.randbytes(rng.randint(SMALLEST_JUNK_BYTES, LARGEST_JUNK_BYTES)),
        )
        for _ in range(count)
    ]


def flood(results_dir: str, files: list[tuple[str, bytes]]) -> dict[str, object]:
    """Write and rename every file into results_dir; return what happened when."""
    landed: list[float] = []
    started = time.time()
    for name, payload in files:
        temp = os.path.join(results_dir, f".{name}.tmp")
        fd = os.open(temp, _CREATE_FLAGS, 0o644)
        try:
            os.write(fd, payload)
        finally:
            os.close(fd)
        landed.append(time.time())
        os.rename(temp, os.path.join(results_dir, name))
    ended = time.time()
    return {
        "names": [name for name, _ in files],
        "sizes": [len(payload) for _, payload in files],
        "landed": landed,
        "started": started,
        "ended": ended,
    }


def main(argv: list[str]) -> int:
    """Prepare, say ready, wait for the go line, flood, report."""
    results_dir, count, seed = argv[0], int(argv[1]), int(argv[2])
    files = junk(count, seed)
    print("ready", flush=True)
    if not sys.stdin.readline():
        return 1  # the benchmark went away before giving the signal
    print(json.dumps(flood(results_dir, files)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
