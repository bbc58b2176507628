"""The ``step`` command line: argparse only; every command calls into the other packages."""

from pipelines.cli.app import main

__all__ = ["main"]
