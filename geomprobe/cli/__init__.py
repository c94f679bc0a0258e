"""The ``geomprobe`` command line: a thin layer over the library.

Each command validates its options, calls one library function and prints the result with rich
(``--json`` prints JSON on stdout instead). :mod:`geomprobe.cli.app` holds the application (one
place for errors, interrupts, threads and progress); one module per command family registers its
commands on it, in the order ``--help`` lists them.
"""

from geomprobe.cli import train, grads, figures, continual, spectrum, audit  # noqa: F401, I001 - registration order
from geomprobe.cli.app import app, console, print_json, progress_bar

__all__ = ["app", "console", "main", "print_json", "progress_bar"]


def main() -> None:
    """Run the ``geomprobe`` command line."""
    app()
