"""A real `celebctl serve` in a subprocess on a free port, for the server tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`celebctl serve --model tiny --device cpu` on 127.0.0.1:PORT with ``home`` as its data
    home; started by :meth:`start`, stopped with SIGINT by :meth:`stop`."""

    def __init__(self, home: Path, *args: str, auth: tuple[str, str] | None = None):
        self.home = Path(home)
        self.port = free_port()
        self.auth = auth
        self.args = list(args)
        self.log_path = self.home.parent / f"serve-{self.port}.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(CELEBCTL_HOME=str(self.home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        env.pop("CELEBCTL_DEBUG", None)
        return env

    def start(self, wait: bool = True) -> ServerProcess:
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celebctl", "serve", "--model", "tiny", "--device", "cpu",
             "--port", str(self.port), *self.args],
            env=self.env(), stdout=log, stderr=subprocess.STDOUT, cwd=str(self.home.parent))
        if wait:
            self.wait_ready()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}):\n"
                                   + self.log())
            try:
                answer = httpx.get(f"{self.url}/api/status", auth=self.auth, timeout=5)
                if answer.status_code == 200 and answer.json()["ready"]:
                    return
                if answer.status_code == 200 and answer.json()["load_error"]:
                    raise RuntimeError(f"the model did not load: {answer.json()}")
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("the server did not get ready in time:\n" + self.log())

    def stop(self, timeout: float = 120) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def celebctl(self, *args: str) -> subprocess.CompletedProcess:
        """A CLI command on the server's data home."""
        return subprocess.run([sys.executable, "-m", "celebctl", *args], env=self.env(),
                              capture_output=True, text=True, timeout=300)
