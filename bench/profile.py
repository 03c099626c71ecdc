"""Where the daemon's CPU goes: py-spy while a select-only run goes through it.

py-spy samples the daemon from outside (ptrace, ``--nonblocking`` so the daemon
is never paused) and writes a speedscope file; :func:`summarize` turns that file
into the functions that were on CPU most often, by self time (the leaf frame of a
sample) and by total time (anywhere on the stack). Samples are counted per
thread, and py-spy records only threads it does not see idle; a thread that is
runnable but waiting for a CPU, or inside a blocking system call such as fsync,
counts as active. On a loaded machine that inflates the totals, so the benchmark
also reports each thread's CPU time from the kernel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any


def find_py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    if os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("py-spy")


def start(pid: int, seconds: int, out: Path, rate: int = 250) -> subprocess.Popen[bytes]:
    py_spy = find_py_spy()
    if py_spy is None:
        raise FileNotFoundError("py-spy is not installed (pip install py-spy)")
    return subprocess.Popen(
        [
            py_spy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(seconds),
            "--rate",
            str(rate),
            "--nonblocking",
            # The gateway's audit writer is a child process.
            "--subprocesses",
            "--format",
            "speedscope",
            "--output",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _frame_label(frame: dict[str, Any]) -> str:
    """``function (package/module.py)``: lines dropped, so a function counts once."""
    name = str(frame.get("name", "?"))
    parts = Path(str(frame.get("file", ""))).parts
    # Keep the path from the package root: "gateway/net/relay.py", "asyncio/sslproto.py".
    for anchor, skip in (("site-packages", 1), ("python3.11", 1), ("gateway", 0), ("cli", 0)):
        if anchor in parts:
            index = len(parts) - 1 - parts[::-1].index(anchor) + skip
            return f"{name} ({'/'.join(parts[index:])})"
    return f"{name} ({'/'.join(parts[-2:])})"


def _is_ours(frame: dict[str, Any]) -> bool:
    parts = Path(str(frame.get("file", ""))).parts
    return "gateway" in parts and "site-packages" not in parts


def summarize(speedscope: Path, top: int = 20) -> dict[str, Any]:
    data = json.loads(speedscope.read_text())
    frames = data["shared"]["frames"]
    # py-spy weighs each sample by the seconds it stands for.
    labels = [_frame_label(frame) for frame in frames]
    ours = {label for frame, label in zip(frames, labels, strict=True) if _is_ours(frame)}
    self_time: defaultdict[str, float] = defaultdict(float)
    total_time: defaultdict[str, float] = defaultdict(float)
    thread_self: dict[str, defaultdict[str, float]] = {}
    threads: dict[str, float] = {}
    for profile in data["profiles"]:
        weights = profile.get("weights") or [1.0] * len(profile["samples"])
        thread_time = 0.0
        own: defaultdict[str, float] = defaultdict(float)
        for stack, weight in zip(profile["samples"], weights, strict=True):
            if not stack:
                continue
            thread_time += weight
            self_time[labels[stack[-1]]] += weight
            own[labels[stack[-1]]] += weight
            for label in {labels[index] for index in stack}:
                total_time[label] += weight
        name = str(profile.get("name", "?"))
        threads[name] = round(thread_time, 3)
        thread_self[name] = own
    sampled = sum(threads.values())

    def ranked(times: dict[str, float], *, only_ours: bool = False) -> list[dict[str, Any]]:
        items = [(k, v) for k, v in times.items() if not only_ours or k in ours]
        best = sorted(items, key=lambda item: item[1], reverse=True)[:top]
        return [
            {
                "function": label,
                "seconds": round(seconds, 3),
                "share": round(seconds / sampled, 4) if sampled else 0.0,
            }
            for label, seconds in best
        ]

    return {
        "sampled_seconds": round(sampled, 3),
        "threads": threads,
        "self": ranked(self_time),
        # Inclusive time of the event loop and thread plumbing is ~100 %: the
        # gateway's own functions are the informative part.
        "total": ranked(total_time, only_ours=True),
        # Shares of all samples, per thread: which thread spends its time where.
        "self_by_thread": {
            name: ranked(own)[: max(5, top // 2)]
            for name, own in thread_self.items()
            if threads[name] >= 0.05 * sampled
        },
    }
