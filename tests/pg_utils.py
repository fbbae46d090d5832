"""A throwaway PostgreSQL server (Debian's `postgresql` package) in a temp dir on a free port."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time

from server_utils import free_port


def _bindir() -> str:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: scripts/test.sh installs Debian's postgresql package")
    return os.path.dirname(found[-1])


class PostgresServer:
    def __init__(self):
        self.bindir = _bindir()
        self.dir = tempfile.mkdtemp(prefix="pagedserve-pg-")  # under /tmp: the postgres user can reach it
        self.port = free_port()
        self.as_root = os.geteuid() == 0  # initdb refuses root: run as the postgres user
        user = "postgres" if self.as_root else os.environ.get("USER", "postgres")
        if self.as_root:
            shutil.chown(self.dir, "postgres", "postgres")
        data = os.path.join(self.dir, "data")
        self._run([f"{self.bindir}/initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8"])
        self._run([f"{self.bindir}/pg_ctl", "-D", data, "-l", os.path.join(self.dir, "log"), "-w", "-t", "60",
                   "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off", "start"])
        self.data, self.user = data, user
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, cmd: list[str]) -> None:
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}")

    def stop(self) -> None:
        if getattr(self, "_stopped", False):  # idempotent: a test may stop it mid-way, its cleanup again
            return
        self._stopped = True
        try:
            self._run([f"{self.bindir}/pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop"])
        finally:
            time.sleep(0.1)
            shutil.rmtree(self.dir, ignore_errors=True)
