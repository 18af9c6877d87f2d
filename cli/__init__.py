"""The ``hotbed`` command line. One module per area, each with ``register(subparsers)``;
``main`` wires them and turns every HotbedError into one clear line and exit code 1.
"""

from cli.main import main

__all__ = ["main"]
