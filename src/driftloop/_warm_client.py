"""The flow-run command of the warm worker: hand this run to the warm engine, or fall back.

Run by the Prefect process worker as ``python -I -S _warm_client.py <socket>`` with the
flow run's environment (``PREFECT__FLOW_RUN_ID`` and the rest). Standard library only,
so the interpreter starts in milliseconds. It connects to the warm engine's Unix
socket, sends its environment and working directory with its standard streams
(``SCM_RIGHTS``), and then stands in for the flow run: it forwards SIGTERM / SIGINT /
SIGHUP to the forked engine process and exits with its exit code. If the warm engine
cannot be reached it replaces itself with ``python -m prefect.engine``, Prefect's own
command, so a flow run never depends on the warm engine being up.

The wire format (shared with :mod:`driftloop.warm_engine`): the client sends a 4-byte
big-endian length and a JSON header ``{"env", "cwd"}``, the three descriptors riding
on the first bytes; the engine answers lines ``pid <n>`` and, when the run ends,
``exit <code>``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _fallback() -> None:
    os.execv(sys.executable, [sys.executable, "-m", "prefect.engine"])


def _connect(path: str) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    return sock


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else os.environ.get("DRIFTLOOP_WARM_SOCKET", "")
    sock = _connect(path) if path else None
    if sock is None:
        _fallback()
        return 1  # not reached
    header = json.dumps({"env": dict(os.environ), "cwd": os.getcwd()}).encode()
    payload = struct.pack(">I", len(header)) + header
    fds = struct.pack("3i", 0, 1, 2)
    sent = sock.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
    if sent < len(payload):
        sock.sendall(payload[sent:])
    reader = sock.makefile("rb")
    first = reader.readline().decode().split()
    if len(first) != 2 or first[0] != "pid":
        # the engine refused the run before forking: run it the ordinary way
        sock.close()
        _fallback()
        return 1  # not reached
    child = int(first[1])

    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    for sig in FORWARDED:
        signal.signal(sig, forward)
    while True:
        try:
            line = reader.readline()
        except InterruptedError:
            continue
        if not line:
            # the engine went away without a verdict: the run's fate is unknown here
            print("driftloop warm engine: connection lost", file=sys.stderr)
            return 1
        words = line.decode().split()
        if len(words) == 2 and words[0] == "exit":
            return int(words[1])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
