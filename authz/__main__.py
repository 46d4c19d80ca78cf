"""`python -m authz` is the `authz` console script."""

import sys

from authz.cli import main

sys.exit(main())
