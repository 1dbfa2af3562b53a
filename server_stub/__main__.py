"""``python -m server_stub --config coordinator.toml``: run the coordinator.

Without the composition root in ``edge.cli`` there is no model evaluation here (server_stub
never imports ``edge.training``); ``fedge coordinator`` adds it when ``[evaluation]`` is set.
"""

import sys

from server_stub.cli import main

sys.exit(main())
