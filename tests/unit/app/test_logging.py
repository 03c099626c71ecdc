"""JSON log lines (``--log-format json``): every line a process writes to stderr
is one JSON object with the stable keys, whether structlog, the standard
library (as uvicorn logs), a warning or an exception produced it. Run in a
child process: configuring logging is the entry point's job, once."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

from gateway.app.logging import STABLE_KEYS

SCRIPT = textwrap.dedent(
    """
    import logging, warnings
    import structlog
    from gateway.app.logging import configure_logging

    configure_logging("json", "info")
    log = structlog.get_logger("gateway.example")
    log.info("relay_started", port=5432)
    log.bind(session_id="s1").warning("grant_expiring", seconds=60)
    log.debug("not_shown")
    try:
        1 / 0
    except ZeroDivisionError:
        log.exception("it_failed")
    logging.getLogger("uvicorn.error").error("Invalid HTTP request received.")
    logging.getLogger("uvicorn.error").info("below warning: not shown")
    warnings.warn("something is deprecated", DeprecationWarning, stacklevel=1)
    """
)
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def test_every_stderr_line_is_a_json_object_with_the_stable_keys() -> None:
    result = subprocess.run(
        [sys.executable, "-W", "always", "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout == ""
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    for line in lines:
        assert set(STABLE_KEYS) <= set(line), line
        assert ISO_UTC.match(line["timestamp"]), line["timestamp"]
    assert [(x["event"], x["level"], x["logger"]) for x in lines] == [
        ("relay_started", "info", "gateway.example"),
        ("grant_expiring", "warning", "gateway.example"),
        ("it_failed", "error", "gateway.example"),
        ("Invalid HTTP request received.", "error", "uvicorn.error"),
        (lines[4]["event"], "warning", "py.warnings"),
    ]
    assert "something is deprecated" in lines[4]["event"]
    assert lines[1]["session_id"] == "s1" and lines[0]["port"] == 5432
    assert "ZeroDivisionError" in lines[2]["exception"]
