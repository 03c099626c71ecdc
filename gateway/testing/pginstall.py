"""What this host offers the throwaway cluster: the server binaries and the OS user.

:func:`find_pg_bin_dir` finds the directory holding ``initdb``, ``pg_ctl`` and
``postgres``; :func:`find_psql` finds the client next to them or on ``PATH``;
:func:`server_os_user` says which unprivileged user the server must run as.

Invariants:

* An explicit ``$PAM_PG_BIN`` that lacks a binary is an error, never a reason to
  guess elsewhere; a missing binary raises :class:`PostgresNotInstalled`, whose
  message says how to install the server.
* As root the server runs as ``postgres`` (or ``$PAM_PG_USER``), never as root
  (PostgreSQL refuses); otherwise :func:`server_os_user` returns None and
  everything runs as the current user.
* Nothing here writes a file or starts a long-lived process.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from gateway.testing.pgerrors import ClusterError

__all__ = [
    "DEFAULT_SERVER_OS_USER",
    "INSTALL_HINT",
    "PG_BIN_ENV",
    "PG_USER_ENV",
    "OsUser",
    "PostgresNotInstalled",
    "find_pg_bin_dir",
    "find_psql",
    "is_traversable_by",
    "server_os_user",
]

#: Environment variable naming the directory that holds initdb, pg_ctl and postgres.
PG_BIN_ENV = "PAM_PG_BIN"
#: Environment variable naming the OS user the server runs as when we are root.
PG_USER_ENV = "PAM_PG_USER"
DEFAULT_SERVER_OS_USER = "postgres"
INSTALL_HINT = (
    "install the server with `apt-get install postgresql-15` (Debian/Ubuntu), "
    f"or set {PG_BIN_ENV} to the directory that holds initdb, pg_ctl and postgres"
)

_REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres")
_DEBIAN_PG_ROOT = Path("/usr/lib/postgresql")
# Seconds: pg_config only prints a path; a hang means something is badly wrong.
_PG_CONFIG_TIMEOUT_S = 10.0


class PostgresNotInstalled(ClusterError):
    """The PostgreSQL server binaries (initdb, pg_ctl, postgres) are missing."""

    def __init__(self, detail: str = "PostgreSQL server binaries not found") -> None:
        # The instructions are the message's second half, not also a hint: the
        # CLI prints both, and saying it twice on one line helps nobody.
        super().__init__(f"{detail}; {INSTALL_HINT}")


def find_pg_bin_dir() -> Path:
    """Return the directory holding ``initdb``, ``pg_ctl`` and ``postgres``.

    Looks, in order, at ``$PAM_PG_BIN``, ``pg_config --bindir``, the highest
    version under ``/usr/lib/postgresql/*/bin`` (Debian's layout) and ``initdb``
    on ``PATH``. Raises :class:`PostgresNotInstalled` if none qualifies.
    """
    explicit = os.environ.get(PG_BIN_ENV)
    if explicit:
        candidate = Path(explicit)
        if _has_server_binaries(candidate):
            return candidate
        # An explicit choice that is wrong is an error, not a reason to guess.
        raise PostgresNotInstalled(
            f"{PG_BIN_ENV}={explicit} does not contain {', '.join(_REQUIRED_BINARIES)}"
        )
    for candidate in _candidate_bin_dirs():
        if _has_server_binaries(candidate):
            return candidate
    raise PostgresNotInstalled()


def find_psql(bin_dir: Path) -> str:
    """The ``psql`` beside the server binaries, else the one on ``PATH``."""
    bundled = bin_dir / "psql"
    if os.access(bundled, os.X_OK):
        return str(bundled)
    found = shutil.which("psql")
    if found is None:
        raise PostgresNotInstalled("psql not found")
    return found


def _candidate_bin_dirs() -> Iterable[Path]:
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"],
                capture_output=True,
                text=True,
                timeout=_PG_CONFIG_TIMEOUT_S,
                check=True,
            ).stdout.strip()
            if out:
                yield Path(out)
    if _DEBIAN_PG_ROOT.is_dir():
        versions = [p for p in _DEBIAN_PG_ROOT.iterdir() if _version_key(p.name) is not None]
        versions.sort(key=lambda p: _version_key(p.name) or (), reverse=True)
        for version_dir in versions:
            yield version_dir / "bin"
    initdb = shutil.which("initdb")
    if initdb is not None:
        # /usr/local/bin/initdb may be a lone symlink; its target's directory
        # is the one that also holds pg_ctl and postgres.
        yield Path(initdb).resolve().parent
        yield Path(initdb).parent


def _version_key(name: str) -> tuple[int, ...] | None:
    if not re.fullmatch(r"\d+(\.\d+)*", name):
        return None
    return tuple(int(part) for part in name.split("."))


def _has_server_binaries(directory: Path) -> bool:
    return all(os.access(directory / name, os.X_OK) for name in _REQUIRED_BINARIES)


@dataclass(frozen=True, slots=True)
class OsUser:
    """An OS account the server runs as: its ids and every group it belongs to."""

    name: str
    uid: int
    gid: int
    groups: frozenset[int]


def server_os_user() -> OsUser | None:
    """The OS user to run the server as, or None to run as ourselves."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get(PG_USER_ENV, DEFAULT_SERVER_OS_USER)
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ClusterError(
            f"running as root, but there is no OS user {name!r} to run PostgreSQL as "
            "(PostgreSQL refuses to run as root)",
            hint=f"create the user, or set {PG_USER_ENV} to an existing unprivileged user",
        ) from None
    groups = frozenset(os.getgrouplist(name, entry.pw_gid))
    return OsUser(name=name, uid=entry.pw_uid, gid=entry.pw_gid, groups=groups)


def is_traversable_by(path: Path, user: OsUser) -> bool:
    """Whether ``user`` may search directory ``path`` (its x bit for that user)."""
    st = path.stat()
    if st.st_uid == user.uid:
        return bool(st.st_mode & 0o100)
    if st.st_gid in user.groups:
        return bool(st.st_mode & 0o010)
    return bool(st.st_mode & 0o001)
