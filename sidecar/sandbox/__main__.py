"""``python -m sidecar.sandbox``: run the sandbox EHR until interrupted."""

import sys

from .cli import main

sys.exit(main())
