"""``python -m edge`` is the ``fedge`` command."""

import sys

from edge.cli import main

sys.exit(main())
