"""Running one measurement in a fresh process, as the benchmarks do: what ran before in a
process (its heap, its caches) moved the ratios they report (experiments/benchmark.py,
experiments/latency.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

PREFIX = "RESULT "


def report(result: dict) -> None:
    """In the child: hand ``result`` back to :func:`run_child`."""
    print(PREFIX + json.dumps(result), flush=True)


def run_child(cmd: list[str]) -> dict | None:
    """Run ``cmd`` (offline) and return what it reported; None, with its error output
    printed, when it failed or reported nothing."""
    run = subprocess.run(cmd, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [x for x in run.stdout.splitlines() if x.startswith(PREFIX)]
    if run.returncode != 0 or not lines:
        print(run.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(lines[0][len(PREFIX):])
