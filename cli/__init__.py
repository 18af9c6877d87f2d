"""The ``hotbed`` command line. One module per area, each with ``register(subparsers)``;
``main`` wires them and turns every failure into one ``error:`` line and exit code 125
(docker's convention; cli.main says which codes mean what).
"""

from cli.main import main

__all__ = ["main"]
