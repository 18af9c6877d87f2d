"""``python -m cli ...`` is the ``hotbed`` command (what ``hotbed up --detach`` re-runs)."""

from cli.main import console

console()
