"""structlog configuration, called once by an entry point (daemon, CLI, demo).

Library modules only call ``structlog.get_logger(__name__)`` and bind context;
they never configure logging. Logs go to stderr.

Invariant (``json``): every line on stderr is one JSON object, written in one
piece (processes sharing stderr do not interleave their lines), with at least the
keys of :data:`STABLE_KEYS` (``timestamp``: ISO 8601 in UTC with a ``Z``;
``level``: ``debug`` .. ``critical``; ``event``: the event's name; ``logger``:
the module that logged it), whether it came from structlog or from a library
logging through the standard library (uvicorn, warnings). Context a module binds
(``session_id``, ``connection_id``, ...) is added as further keys; an exception
is ``exception`` (its formatted traceback).
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Final, Literal, TextIO

import structlog

LogFormat = Literal["console", "json"]

#: Keys every JSON log line carries (docs/operations.md, "Log lines").
STABLE_KEYS: Final = ("timestamp", "level", "event", "logger")


class _NamedWriteLogger(structlog.WriteLogger):
    """structlog's WriteLogger, knowing the name it was asked for (for
    ``add_logger_name``). It writes each line in one piece (PrintLogger's print()
    writes the newline apart): the daemon, its relay workers and audit writers
    share one stderr, and a line written at once (up to PIPE_BUF) is never
    interleaved with another's."""

    def __init__(self, file: TextIO, name: str) -> None:
        super().__init__(file)
        self.name = name


def _logger_factory(file: TextIO) -> Any:
    def factory(*args: Any) -> _NamedWriteLogger:
        name = args[0] if args and isinstance(args[0], str) else "pam"
        return _NamedWriteLogger(file, name)

    return factory


def configure_logging(fmt: LogFormat = "console", level: str = "info") -> None:
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=_logger_factory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    # uvicorn and friends log through the stdlib: the same keys, the same renderer,
    # on stderr, and quiet below warnings.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(max(numeric, logging.WARNING))
    logging.captureWarnings(True)
