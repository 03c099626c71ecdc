"""Fixtures shared by every test suite (unit, property, integration).

Suite-specific fixtures live in the suite's own ``conftest.py``; the real
PostgreSQL server, for instance, is in ``tests/integration/conftest.py``.
"""
