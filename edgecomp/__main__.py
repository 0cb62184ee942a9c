"""``python -m edgecomp`` runs the command line."""

import sys

from edgecomp.cli import main

sys.exit(main())
