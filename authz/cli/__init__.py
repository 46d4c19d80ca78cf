"""The `authz` command: one module per command group, `main` the console script's entry."""

from authz.cli.main import main

__all__ = ["main"]
