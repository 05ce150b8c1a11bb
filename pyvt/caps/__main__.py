"""``python -m pyvt.caps`` (the same as ``python -m pyvt caps``)."""

import sys

from .cli import main

sys.exit(main())
