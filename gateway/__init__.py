"""pam gateway: just-in-time, audited access to PostgreSQL.

Layers, with dependencies pointing one way only:
``cli -> app -> store -> access -> audit | credentials -> net -> protocol``
(docs/architecture.md; import-linter checks it).
"""

__version__ = "0.1.0"
