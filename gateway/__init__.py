"""pam gateway: just-in-time, audited access to PostgreSQL.

Layers, with dependencies pointing one way only:
``cli -> gateway.access.service/api/daemon -> gateway.net.relay/upstream -> gateway.protocol``.
"""

__version__ = "0.1.0"
