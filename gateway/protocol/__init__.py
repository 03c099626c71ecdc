"""Sans-IO PostgreSQL frontend/backend protocol, version 3.

Bytes in, messages out, bytes to send. Nothing in this package performs I/O,
imports asyncio, socket, ssl or logging, or keeps a clock: the asyncio shell in
``gateway.net`` drives it. See the PostgreSQL documentation, chapter
"Frontend/Backend Protocol" (55 in PostgreSQL 15), for every message used here.
"""
