"""The data path's asyncio code: the only place that touches sockets for clients.

The doors clients come in by (today a loopback listener per grant), one
connection's life in named steps, the relay, the upstream connection and TLS
contexts. It drives the sans-IO :mod:`gateway.protocol` and knows nothing of the
store, grants or the audit format: what it needs from above (the grant's
checks, targets, the audit tap, connection records) it declares as ports
(``typing.Protocol``) that the packages above implement.
"""
