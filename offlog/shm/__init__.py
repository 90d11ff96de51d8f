"""Shared-memory fast path: one ring per client, a semaphore doorbell.

``layout`` defines the bytes, ``ring`` moves them (producer and consumer),
``channel`` creates, opens and cleans up the named objects behind a ring.
"""

from .channel import ClientRing, ServerRing, sweep_stale, unsupported_reason
from .layout import DEFAULT_CAPACITY, check_capacity
from .ring import RingCorrupt

__all__ = [
    "ClientRing",
    "ServerRing",
    "sweep_stale",
    "unsupported_reason",
    "DEFAULT_CAPACITY",
    "check_capacity",
    "RingCorrupt",
]
