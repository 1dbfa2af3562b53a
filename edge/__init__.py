"""The fedge device agent and the wire contract shared with the coordinator.

``edge`` imports ``kernels`` and never ``server_stub``; ``edge.wire`` and
``edge.transport`` are the contract both sides import.
"""

from __future__ import annotations

__version__ = "0.1.0"
