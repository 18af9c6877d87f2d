"""``python -m bench verify [FILE ...]``: say which run wrote each results file.

A file passes if it carries the run block and digest that :mod:`bench.common.results`
writes and its digest still matches (nothing was edited or merged in after the run);
its provenance is printed. Without arguments every ``bench/results/*.json`` is checked.
Exit status 1 if any file fails.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.common import results


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench verify", description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="*", type=Path)
    args = p.parse_args(argv)
    files = args.files or sorted(results.RESULTS.glob("*.json"))
    bad = 0
    for f in files:
        try:
            doc = results.load(f)
        except (results.NotOneRun, ValueError, OSError) as exc:
            bad += 1
            print(f"FAIL {exc}" if isinstance(exc, results.NotOneRun) else f"FAIL {f}: {exc}")
        else:
            print(f"ok   {f}: {results.describe(doc)}")
    return 1 if bad else 0
