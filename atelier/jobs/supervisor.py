"""The server's side of the worker: start it, restart it if it dies, stop it on shutdown."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time

from pydantic import SecretStr

from atelier.config import Settings

log = logging.getLogger("atelier.jobs")


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as ATELIER_* variables, so the worker sees what the server sees."""
    env = dict(os.environ)
    for name, value in settings.model_dump().items():
        if isinstance(value, SecretStr):  # str() of a SecretStr is "**********": pass the secret itself
            value = value.get_secret_value()
        if value is not None:
            env[f"ATELIER_{name.upper()}"] = str(value)
    return env


class WorkerSupervisor:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"  # the name its jobs' leases carry
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)

    def start(self) -> None:
        self._spawn()
        self._thread.start()

    def _spawn(self) -> None:
        self.spawned_at = time.monotonic()
        # One name for every worker this server starts: a restarted one reclaims its predecessor's jobs.
        env = settings_env(self.settings) | {"ATELIER_WORKER_ID": self.worker_id}
        self.proc = subprocess.Popen([sys.executable, "-m", "atelier.jobs.worker"], env=env)

    def _watch(self) -> None:
        """Restart a worker that died, waiting longer after each quick death (0.5 s, 1 s, 2 s … 60 s), so a
        worker that crashes at start does not spin; one that lived a minute starts the wait over."""
        delay = 0.5
        while not self._stop.wait(0.5):
            if self.proc.poll() is None:
                continue
            lived = time.monotonic() - self.spawned_at
            delay = 0.5 if lived > 60 else min(60.0, delay * 2)
            log.warning("job worker exited with %s after %.0f s; restarting it in %.1f s", self.proc.returncode,
                        lived, delay)
            if self._stop.wait(delay):
                return
            self.restarts += 1
            self._spawn()

    def status(self) -> dict:
        alive = self.proc is not None and self.proc.poll() is None
        return {"pid": self.proc.pid if self.proc else None, "id": self.worker_id, "alive": alive,
                "restarts": self.restarts}

    def stop(self) -> None:
        self._stop.set()
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
