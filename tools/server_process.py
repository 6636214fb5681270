"""`meshserve serve` in a subprocess, for benchmarks and tests that drive a real server.

The port is picked by the server (`--port 0`) and read from its JSON log, as is the
moment it says it is ready (warm-up done).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time

_STARTED = re.compile(r'"event": "server_started".*"port": (\d+)')
_HTTP_PORT = re.compile(r'"http_port": (\d+)')


class ServeProcess:
    """With wait_ready (the default) the constructor returns once the server is ready, as
    a client watching readiness would wait; `ready_after` is that wait in seconds."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, timeout: float = 240.0,
                 wait_ready: bool = True, cwd: str | None = None):
        self.stderr_lines: list[str] = []
        begun = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meshserve.tools.cli", "serve", "--port", "0", *args],
            cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **(env or {})},
        )
        self._started = threading.Event()
        self.ready = threading.Event()
        self.port: int | None = None
        self.http_port: int | None = None  # with --http-port
        self.ready_after: float | None = None
        self._begun = begun
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._started.wait(timeout) or self.port is None:
            self.kill()
            raise RuntimeError("server did not start:\n" + self.tail())
        self.target = f"127.0.0.1:{self.port}"
        if wait_ready and not (self.ready.wait(timeout) and self.proc.poll() is None):
            self.kill()
            raise RuntimeError(f"server not ready within {timeout} s:\n" + self.tail())

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.stderr_lines.append(line)
            m = _STARTED.search(line)
            if m:
                self.port = int(m.group(1))
                http = _HTTP_PORT.search(line)
                self.http_port = int(http.group(1)) if http else None
                self._started.set()
            if '"event": "ready"' in line:
                self.ready_after = time.monotonic() - self._begun
                self.ready.set()
        self._started.set()  # exited before starting
        self.ready.set()

    @property
    def log(self) -> str:
        return "".join(self.stderr_lines)

    def tail(self, lines: int = 30) -> str:
        return "".join(self.stderr_lines[-lines:])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.kill()
