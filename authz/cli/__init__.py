"""The `authz` command: one module per command group, `main` the console script's entry."""

import os

# gRPC's C core writes its own lines straight to stderr, outside AUTHZ_LOG_FORMAT, and reads
# GRPC_VERBOSITY once, when grpc is first imported: so here, before anything imports it. What
# it would report (a failed bind) reaches our log as the exception it raises; an operator's
# own GRPC_VERBOSITY still wins.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

from authz.cli.main import main

__all__ = ["main"]
