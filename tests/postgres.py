"""A throwaway PostgreSQL server for tests: `postgres_server` (session; stop/start it) and `postgres_url`.

The server runs from a temp dir on a free port and is removed at the end; as root it runs as the `postgres`
user (it refuses root). Tests that need it are skipped, saying why, only where the binaries are absent.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from deploy.serve_env import free_port

_BINARIES = ("initdb", "pg_ctl", "postgres")


def find_bindir() -> Path | None:
    """Where initdb/pg_ctl/postgres live: PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    on_path = [shutil.which(b) for b in _BINARIES]
    if all(on_path):
        return Path(on_path[0]).resolve().parent
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if all((Path(d) / b).exists() for b in _BINARIES):
            return Path(d)
    return None


@dataclass
class PostgresServer:
    bindir: Path
    root: Path                                  # temp dir: data/, the socket, server.log
    port: int
    run_as: list[str] = field(default_factory=list)     # ["runuser", "-u", "postgres", "--"] when root
    _names: Iterator[int] = field(default_factory=itertools.count)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str) -> None:
        subprocess.run([*self.run_as, str(self.bindir / argv[0]), *argv[1:]], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)

    def start(self) -> None:
        """Start (or restart) the server and return once it accepts connections (`pg_ctl -w`)."""
        self._run("pg_ctl", "-D", str(self.root / "data"), "-l", str(self.root / "server.log"), "-w", "-o",
                  f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")

    def stop(self) -> None:
        """Stop the server for real (`pg_ctl stop -m fast`: clients are disconnected) and wait until it is down."""
        self._run("pg_ctl", "-D", str(self.root / "data"), "-w", "-m", "fast", "stop")

    def new_database(self) -> str:
        """A fresh, empty database on this server -> its URL (tests never see each other's rows)."""
        import psycopg

        name = f"t{os.getpid()}_{next(self._names)}"
        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bindir = find_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: install the Debian "
                    "package `postgresql` (`make sysdeps`)")
    root = Path(tempfile.mkdtemp(prefix="ensemble-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:              # postgres refuses to run as root: hand it the directory and its user
        shutil.chown(root, "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    server = PostgresServer(bindir, root, free_port(), run_as)
    subprocess.run([*run_as, str(bindir / "initdb"), "-D", str(root / "data"), "-A", "trust", "-U", "postgres",
                    "--no-sync"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)
    server.start()
    try:
        yield server
    finally:
        try:
            server.stop()
        except subprocess.CalledProcessError:
            pass                       # already stopped (a test failed between stop and start)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """The throwaway server's URL (its `postgres` database); tests that write use new_database()."""
    return postgres_server.url
