"""Defaults that the server, the client and the command line share.

This module imports nothing, so the server process can name them without
loading the client stack.
"""

#: Where the server listens and clients connect unless told otherwise (docs/protocol.md 1).
DEFAULT_SOCK_PATH = "/tmp/offlog.sock"
#: Milliseconds a client waits for the server, as in offlog 0.x's documentation (and unlike its code).
DEFAULT_TIMEOUT = 5000
#: Milliseconds ``offlog reopen`` waits for the answer by default (the server
#: waits up to 5 s for each file that is busy writing).
REOPEN_TIMEOUT = 60_000
#: Seconds a new connection has, in all, to complete its handshake (the server's --handshake-timeout).
HANDSHAKE_TIMEOUT = 10.0
#: Bytes of incomplete frames a server holds for all its clients together (--max-frame-memory).
MAX_FRAME_MEMORY = 256 * 1024 * 1024
