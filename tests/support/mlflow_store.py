"""MLflow stores for tests: a migrated SQLite database to copy, and a real ``mlflow server`` on loopback.

Creating an MLflow SQLite database runs every schema migration (5-10 s on a busy 2-core machine),
so tests copy one migrated template instead. The server runs in its own process group: it starts
helper processes (uvicorn workers), and ``stop`` ends them all.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def migrated_sqlite_db(path: Path) -> Path:
    """An empty MLflow database with the current schema at ``path``."""
    from mlflow import MlflowClient

    path.parent.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{path}"
    MlflowClient(tracking_uri=uri, registry_uri=uri).search_experiments()
    return path


def copy_db(template: Path, dest: Path) -> str:
    """Copy the template database to ``dest``; returns its tracking URI."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, dest)
    return f"sqlite:///{dest}"


def mlflow_server_command(port: int, backend_store_uri: str, artifacts_destination: str) -> list[str]:
    """`mlflow server` on loopback with one worker, a backend store and where artifacts are proxied to."""
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        backend_store_uri,
        "--artifacts-destination",
        artifacts_destination,
    ]


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a SQLite backend and a local artifact root."""

    def __init__(self, workdir: Path, template_db: Path | None = None) -> None:
        self.workdir = workdir
        self.db = workdir / "server.db"
        self.artifacts = workdir / "server-artifacts"
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = workdir / "server.log"
        workdir.mkdir(parents=True, exist_ok=True)
        if template_db is not None and not self.db.exists():
            shutil.copyfile(template_db, self.db)

    def start(self) -> MlflowServer:
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        env.pop("MLFLOW_TRACKING_URI", None)
        cmd = mlflow_server_command(self.port, f"sqlite:///{self.db}", str(self.artifacts))
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        return self

    def wait_healthy(self, timeout: float = 120) -> MlflowServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy after {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        """Stop the server and every helper process it started (its whole process group)."""
        if self.proc is None:
            return
        stop_process_group(self.proc)
        self.proc = None


def stop_process_group(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM the process group ``proc`` leads, then SIGKILL whatever is left."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        proc.wait()
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _group_alive(pgid):
            proc.poll()  # reap the leader: a zombie still counts as a member of the group
            time.sleep(0.1)
        if not _group_alive(pgid):
            break
    proc.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - still there, not ours to signal
        return True
    return True
