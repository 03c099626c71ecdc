"""pam's benchmark: direct PostgreSQL, the gateway and pgbouncer, measured alike.

One command (``python -m bench``, see ``--help`` and docs/performance.md) starts a
throwaway PostgreSQL with TLS and scram-sha-256, a gateway daemon with an access
session, and pgbouncer in session mode when it is installed; runs every workload
against every target, interleaved round by round; prints one table and writes the
raw numbers as JSON. It is a measuring tool, not a test: it judges nothing.

Nothing here imports from ``tests/``; the gateway is driven as a user drives it,
through ``python -m cli`` processes.
"""
