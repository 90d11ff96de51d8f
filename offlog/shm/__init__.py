"""Shared-memory fast path: one ring per client, a semaphore doorbell.

``layout`` defines the bytes, ``ring`` moves them (producer and consumer),
``objects`` creates, checks and maps the sealed memory behind a ring.
"""

from .layout import DEFAULT_CAPACITY, check_capacity
from .objects import ClientRing, ServerRing, UnsafeRing, unsupported_reason
from .ring import RingCorrupt

__all__ = [
    "ClientRing",
    "ServerRing",
    "UnsafeRing",
    "unsupported_reason",
    "DEFAULT_CAPACITY",
    "check_capacity",
    "RingCorrupt",
]
