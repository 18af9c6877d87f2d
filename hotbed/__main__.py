"""``python -m hotbed ...`` is the ``hotbed`` command."""

from hotbed.cli.main import console

console()
