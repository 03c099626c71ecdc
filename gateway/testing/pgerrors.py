"""The one error class of the throwaway PostgreSQL cluster.

Every failure of :mod:`gateway.testing.pgcluster` and its helper modules
(finding the binaries, running the server's commands, quoting SQL) is a
:class:`ClusterError`, a :class:`~gateway.errors.GatewayError`, so ``pam demo``
prints it as one line with its hint. Invariant: no message built from these
modules carries a password (callers mask them before raising).
"""

from __future__ import annotations

from gateway.errors import GatewayError

__all__ = ["ClusterError"]


class ClusterError(GatewayError):
    """The throwaway cluster could not be set up, started, stopped or queried."""
