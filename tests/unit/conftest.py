"""Fixtures shared by the unit tests: the store tests' clock and store URL."""

from store_support import clock, pg_store_server, store_url

__all__ = ["clock", "pg_store_server", "store_url"]
