"""Fixtures shared by the unit tests: the store tests' clock and store URL."""

from store_support import clock, store_url

__all__ = ["clock", "store_url"]
