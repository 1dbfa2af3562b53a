"""The fedge coordinator: registry, selection, rounds, aggregation, persistence.

``server_stub`` imports ``kernels``, ``edge.wire`` and ``edge.transport`` (the shared
contract) and never ``edge.agent``.
"""

from __future__ import annotations
