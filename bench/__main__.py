"""``python -m bench NAME [options]``: dispatch to ``bench/NAME.py``'s ``main(argv)``."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def available() -> list[str]:
    here = Path(__file__).parent
    return sorted(
        m.name for m in pkgutil.iter_modules([str(here)]) if not m.name.startswith("_") and m.name != "common"
    )


def main() -> int:
    names = available()
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(f"usage: python -m bench {{{','.join(names)}}} [options]")
        return 2
    name = sys.argv[1]
    if name not in names:
        print(f"unknown benchmark {name!r}; have: {', '.join(names)}")
        return 2
    module = importlib.import_module(f"bench.{name}")
    return int(module.main(sys.argv[2:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
