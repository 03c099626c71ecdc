"""Composition roots: the daemon, the control API, the audit writer process.

The only package that opens the store and wires the others together
(settings, logging, the grant service, credentials, the audit runtime). The
CLI sits above it; nothing in ``gateway`` imports it.
"""
