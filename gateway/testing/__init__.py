"""Test and demo infrastructure: a throwaway PostgreSQL cluster and helpers.

Used by the tests, the benchmark and ``pam demo`` only; an import-linter contract
keeps every other production module from importing it.
"""
