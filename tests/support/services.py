"""The shared deployment, started from packages on loopback: PostgreSQL, an S3 server, Prefect and MLflow.

What infra/compose.yaml describes, without Docker: a throwaway PostgreSQL 15 cluster (Debian's
package, run as the ``postgres`` user), moto's standalone S3 server with IAM credentials enforced,
a Prefect server on Postgres, an MLflow tracking server on Postgres whose artifacts go to a bucket,
and a bucket for the DVC remote. Credentials live in environment variables only. Every service
runs in its own process group; ``stop`` ends it and anything it started (a worker's flow runs
included).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import psutil

from tests.support.mlflow_store import mlflow_server_command

POOL = "gist-local"  # the process work pool of infra/prefect.yaml
MLFLOW_BUCKET = "gist-mlflow"
DVC_BUCKET = "gist-dvc"
REGION = "us-east-1"


def postgres_bin() -> Path | None:
    """The folder of Debian's PostgreSQL programs (initdb, pg_ctl), if installed."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def base_env(**extra: str) -> dict[str, str]:
    """This environment without anything that would point a service at another store or server."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_TRACKING", "AWS_", "MLFLOW_S3"))
    }
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


class Service:
    """A process in its own session; ``stop`` signals its group, then kills any descendant left."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logs: Path, cwd: Path | None = None) -> None:
        self.name, self.argv, self.env, self.cwd = name, argv, env, cwd
        self.log = logs / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Service:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self

    def wait(self, ready: Callable[[], bool], timeout: float = 180) -> Service:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.tail()}")
            if ready():
                return self
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s:\n{self.tail()}")

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self, first: signal.Signals = signal.SIGTERM, grace: float = 15) -> None:
        if self.proc is None or self.proc.poll() is not None and not _group(self.proc.pid):
            return
        try:
            descendants = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            descendants = []
        for sig, wait in ((first, grace), (signal.SIGKILL, 5)):
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and (self.proc.poll() is None or _group(self.proc.pid)):
                time.sleep(0.1)
            if self.proc.poll() is not None and not _group(self.proc.pid):
                break
        for child in descendants:  # e.g. a worker's flow runs, each in a session of its own
            with suppress(psutil.NoSuchProcess):
                child.kill()
        self.proc.wait(timeout=10)


def _group(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover
        return True
    return any(p.info["pid"] != pgid or p.status() != psutil.STATUS_ZOMBIE for p in _members(pgid))


def _members(pgid: int) -> list[psutil.Process]:
    out = []
    for proc in psutil.process_iter(["pid"]):
        with suppress(psutil.Error):
            if os.getpgid(proc.info["pid"]) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
    return out


class Postgres:
    """A throwaway cluster: initdb + pg_ctl as the ``postgres`` user, listening on 127.0.0.1 only."""

    def __init__(self, port: int) -> None:
        self.bin = postgres_bin()
        if self.bin is None:
            raise RuntimeError("PostgreSQL's programs are not installed (Debian package postgresql-15)")
        # Outside pytest's temp folders: the postgres user must be able to walk every parent folder.
        self.root = Path(tempfile.mkdtemp(prefix="gist-pg-"))
        os.chmod(self.root, 0o755)
        self.dir, self.port = self.root / "pg", port
        self.data = self.dir / "data"
        self.as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _run(self, *argv: str) -> None:
        # cwd "/": the postgres user must be able to read its working directory
        proc = subprocess.run([*self.as_postgres, *argv], cwd="/", capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:2])} failed ({proc.returncode}): {proc.stderr[-2000:]}")

    def start(self) -> Postgres:
        """initdb on first start, then pg_ctl start (also after ``stop``: the data stays)."""
        if not self.data.exists():
            self.dir.mkdir(parents=True)
            if self.as_postgres:
                shutil.chown(self.dir, "postgres", "postgres")
            self._run(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8")
        options = f"-k {self.data} -p {self.port} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.dir / "server.log")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", log, "-w", "-t", "60", "-o", options, "start")
        return self

    def stop(self) -> None:
        with suppress(RuntimeError):
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def create_databases(self, *names: str) -> None:
        for name in names:
            subprocess.run(
                [
                    str(self.bin / "psql"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-U",
                    "postgres",
                    "-c",
                    f"CREATE DATABASE {name}",
                ],
                check=True,
                capture_output=True,
            )


@dataclass
class SharedServices:
    """PostgreSQL, S3 (moto), a Prefect server and an MLflow tracking server, up for a ``with`` block."""

    root: Path
    ports: dict[str, int] = field(default_factory=lambda: {k: free_port() for k in ("pg", "s3", "prefect", "mlflow")})
    credentials: dict[str, str] = field(default_factory=dict)  # AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
    services: dict[str, Service] = field(default_factory=dict)
    postgres: Postgres | None = None

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def s3_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def prefect_api(self) -> str:
        return f"http://127.0.0.1:{self.ports['prefect']}/api"

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.ports['mlflow']}"

    def s3_env(self) -> dict[str, str]:
        return {**self.credentials, "AWS_DEFAULT_REGION": REGION}

    def client_env(self, **extra: str) -> dict[str, str]:
        """What a host that runs the pipeline against these services sets (compose's worker does the same)."""
        env = base_env(
            PREFECT_API_URL=self.prefect_api,
            MLFLOW_TRACKING_URI=self.mlflow_uri,
            # downloads through the tracking server: clients need not reach S3 (and moto refuses
            # presigned URLs once it checks credentials)
            MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD="false",
            **self.s3_env(),
        )
        env.update(extra)
        return env

    def __enter__(self) -> SharedServices:
        self.root.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        try:
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self) -> None:
        moto = Service("moto", ["moto_server", "-H", "127.0.0.1", "-p", str(self.ports["s3"])], base_env(), self.logs)
        self.services["moto"] = moto.start()
        self.postgres = Postgres(self.ports["pg"]).start()
        self.postgres.create_databases("prefect", "mlflow")
        moto.wait(lambda: http_ok(f"{self.s3_url}/moto-api/"))
        self.credentials = _buckets_and_credentials(self.s3_url)
        pg = f"127.0.0.1:{self.ports['pg']}"
        prefect_env = base_env(
            PREFECT_HOME=str(self.root / "prefect-server-home"),
            PREFECT_API_DATABASE_CONNECTION_URL=f"postgresql+asyncpg://postgres@{pg}/prefect",
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_UI_API_URL="/api",
        )
        argv = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
        self.services["prefect"] = Service(
            "prefect", [*argv, "--port", str(self.ports["prefect"])], prefect_env, self.logs
        )
        (self.root / "mlflow-cwd").mkdir(exist_ok=True)
        mlflow_env = base_env(
            MLFLOW_S3_ENDPOINT_URL=self.s3_url, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", **self.s3_env()
        )
        self.services["mlflow"] = Service(
            "mlflow",
            mlflow_server_command(
                self.ports["mlflow"],
                # SQLAlchemy 2 maps a bare postgresql:// to psycopg 3: name the installed driver
                f"postgresql+psycopg2://postgres@{pg}/mlflow",
                f"s3://{MLFLOW_BUCKET}/artifacts",
            ),
            mlflow_env,
            self.logs,
            cwd=self.root / "mlflow-cwd",
        )
        self.services["prefect"].start()
        self.services["mlflow"].start()
        self.services["prefect"].wait(lambda: http_ok(f"{self.prefect_api}/ready"))
        self.services["mlflow"].wait(lambda: http_ok(f"{self.mlflow_uri}/health"))

    def __exit__(self, *exc: object) -> None:
        for name in ("worker", "mlflow", "prefect", "moto"):
            if name in self.services:
                # a Prefect worker stops on SIGINT (it ignores SIGTERM) and ends its flow runs with it
                self.services[name].stop(first=signal.SIGINT if name == "worker" else signal.SIGTERM)
        if self.postgres is not None:
            self.postgres.remove()

    def start_worker(self, pool: str, env: dict[str, str], cwd: Path) -> Service:
        argv = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool]
        worker = Service("worker", argv, env, self.logs, cwd=cwd).start()
        self.services["worker"] = worker
        return worker.wait(lambda: "started!" in worker.tail(20000), timeout=120)


def _buckets_and_credentials(s3_url: str) -> dict[str, str]:
    """Create the buckets and an IAM user's key, then make moto check every request's credentials."""
    bootstrap = {"aws_access_key_id": "bootstrap", "aws_secret_access_key": "bootstrap", "region_name": REGION}
    s3 = boto3.client("s3", endpoint_url=s3_url, **bootstrap)
    for bucket in (MLFLOW_BUCKET, DVC_BUCKET):
        s3.create_bucket(Bucket=bucket)
    iam = boto3.client("iam", endpoint_url=s3_url, **bootstrap)
    iam.create_user(UserName="gist")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName="gist", PolicyName="s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="gist")["AccessKey"]
    request = urllib.request.Request(
        f"{s3_url}/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"}
    )
    urllib.request.urlopen(request, timeout=10).read()
    return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}


def bucket_keys(s3_url: str, credentials: dict[str, str], bucket: str, prefix: str = "") -> list[str]:
    """Every object key in a bucket (under ``prefix``)."""
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_url,
        aws_access_key_id=credentials["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=credentials["AWS_SECRET_ACCESS_KEY"],
        region_name=REGION,
    )
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [obj["Key"] for obj in page.get("Contents", [])]
    return keys
