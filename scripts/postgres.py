"""Private PostgreSQL clusters for the demo, tests and benchmarks.

:class:`PostgresServer` runs a throwaway cluster (``initdb`` + ``pg_ctl``) on a
free loopback port with trust authentication, ``fsync=off`` and one database,
so nothing depends on a system-wide PostgreSQL being configured or running.
``TEST_DATABASE_DSN`` in the environment selects an existing server instead
(:func:`external_postgres`), like ``MQTT_HOST``/``MQTT_PORT`` do for brokers.

PostgreSQL refuses to run as root: as root the cluster runs as the ``postgres``
user (``runuser -u postgres``) in a directory that user can reach.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

from scripts.brokers import free_port

_LOG = logging.getLogger(__name__)

__all__ = ["PostgresServer", "external_postgres", "find_postgres_bin", "postgres_available"]

_INSTALL_HINT = ("PostgreSQL server binaries (initdb, pg_ctl) were not found (looked in PATH and "
                 "/usr/lib/postgresql/*/bin). Run bash scripts/bootstrap.sh as root, which installs them, "
                 "or `apt-get install postgresql`; or point TEST_DATABASE_DSN at a running server.")
_RUN_AS = "postgres"  # the Debian package's system user, used when we are root


def find_postgres_bin() -> Path:
    """The directory holding ``initdb`` and ``pg_ctl``: PATH first, else the newest Debian install."""
    found = shutil.which("pg_ctl")
    candidates: list[Path] = []
    if found:
        candidates.append(Path(os.path.realpath(found)).parent)
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += [Path(p) for p in sorted(versions, key=_version_key, reverse=True)]
    candidates += [Path("/usr/local/pgsql/bin")]
    for d in candidates:
        if all(os.access(d / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "postgres")):
            return d
    raise RuntimeError(_INSTALL_HINT)


def _version_key(path: str) -> tuple[int, ...]:
    m = re.search(r"/postgresql/([\d.]+)/bin", path)
    return tuple(int(x) for x in m.group(1).split(".") if x) if m else (0,)


def postgres_available() -> bool:
    try:
        find_postgres_bin()
    except RuntimeError:
        return False
    return True


def external_postgres() -> str | None:
    """``TEST_DATABASE_DSN`` when set: tests and benchmarks then use that server."""
    return os.environ.get("TEST_DATABASE_DSN") or None


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _reachable(path: Path, uid: int, gid: int) -> bool:
    """Whether ``uid`` can traverse every directory down to ``path`` (so root can hand it a subdirectory)."""
    for d in [path, *path.parents]:
        try:
            st = os.stat(d)
        except OSError:
            return False
        if st.st_uid == uid:
            bit = stat.S_IXUSR
        elif st.st_gid == gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


class PostgresServer:
    """One throwaway cluster on a fixed free loopback port: ``start()`` / ``stop()`` / ``kill()``.

    ``dsn`` is ``postgresql://postgres@127.0.0.1:PORT/DBNAME``. ``close()`` (or
    leaving the ``with`` block) stops it and deletes any directory it created
    outside ``workdir``.
    """

    host = "127.0.0.1"
    user = "postgres"

    def __init__(self, workdir: str | Path, port: int | None = None, dbname: str = "smartbasket") -> None:
        self.bindir = find_postgres_bin()
        self.port = port or free_port()
        self._fixed_port = port is not None
        self.dbname = dbname
        self._owned_dirs: list[Path] = []
        self._as: list[str] = []
        workdir = Path(workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        uid = gid = None
        if _is_root():
            import pwd

            try:
                pw = pwd.getpwnam(_RUN_AS)
            except KeyError:
                raise RuntimeError(f"running as root but there is no '{_RUN_AS}' user to run PostgreSQL as; "
                                   f"install the postgresql package or run as a normal user") from None
            uid, gid = pw.pw_uid, pw.pw_gid
            runuser = shutil.which("runuser") or "/sbin/runuser"
            self._as = [runuser, "-u", _RUN_AS, "--"]
            if not _reachable(workdir, uid, gid):
                # e.g. pytest's /tmp/pytest-of-root (mode 700): use a 755 directory of our own instead.
                workdir = Path(tempfile.mkdtemp(prefix="sb-postgres-"))
                os.chmod(workdir, 0o755)
                self._owned_dirs.append(workdir)
        self.root = workdir / "pg"
        self.datadir = self.root / "data"
        self.logfile = self.root / "postgres.log"
        self.sockdir = self.root / "sock"
        if len(str(self.sockdir)) > 90:  # unix socket paths are limited to ~107 bytes
            self.sockdir = Path(tempfile.mkdtemp(prefix="sb-pgs-"))
            self._owned_dirs.append(self.sockdir)
        for d in (self.root, self.sockdir):
            d.mkdir(parents=True, exist_ok=True)
            if uid is not None:
                os.chown(d, uid, gid)
        os.chmod(self.root, 0o700)
        self._initialized = (self.datadir / "PG_VERSION").exists()

    # --- public -------------------------------------------------------------------------------
    @property
    def dsn(self) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.dbname}"

    def start(self, timeout: float = 30.0) -> None:
        """Create the cluster on first use, start it and make sure the database exists."""
        if not self._initialized:
            self._initdb()
        if self.running():
            return
        self._clear_stale_pidfile()
        for attempt in range(3):
            try:
                self._pg_ctl_start(timeout)
                break
            except RuntimeError:
                # Someone took the port between free_port() and startup: pick another one.
                if self._fixed_port or attempt == 2 or not _accepts(self.host, self.port):
                    raise
                self.port = free_port()
        self._create_database()

    def stop(self) -> None:
        """``pg_ctl stop -m fast``: disconnects clients, keeps the data for a later ``start()``."""
        if not self._initialized or not (self.datadir / "postmaster.pid").exists():
            return
        res = self._run([str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "fast", "-w", "-t", "30",
                         "stop"], check=False)
        if res.returncode != 0 and self.running():
            _LOG.warning("pg_ctl stop failed (%s); killing the postmaster", res.stdout.strip()[-300:])
            self.kill()

    def kill(self) -> None:
        """SIGKILL the postmaster and its children (a crash, for tests of a database that disappears)."""
        pid = self._postmaster_pid()
        if pid is None or not _pid_alive(pid):
            return
        for victim in [pid, *_children(pid)]:
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (_pid_alive(pid) or _accepts(self.host, self.port)):
            time.sleep(0.05)
        self._clear_stale_pidfile()

    def running(self) -> bool:
        pid = self._postmaster_pid()
        return pid is not None and _pid_alive(pid)

    def close(self) -> None:
        """Stop and remove the directories created outside ``workdir``."""
        try:
            self.stop()
        finally:
            for d in self._owned_dirs:
                shutil.rmtree(d, ignore_errors=True)
            self._owned_dirs.clear()

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.logfile.read_text(encoding="utf-8", errors="replace")[-n:]
        except OSError:
            return ""

    def __enter__(self) -> "PostgresServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ----------------------------------------------------------------------------
    def _run(self, argv: list[str], check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PGTZ": "UTC"}
        env.pop("PGDATA", None)
        res = subprocess.run([*self._as, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=env, cwd=self.root if self._as else None, timeout=timeout)
        if check and res.returncode != 0:
            raise RuntimeError(f"{Path(argv[0]).name} failed with exit code {res.returncode}: "
                               f"{res.stdout.strip()[-2000:]}\n{self.log_tail()}")
        return res

    def _initdb(self) -> None:
        if self.datadir.exists() and any(self.datadir.iterdir()):
            raise RuntimeError(f"{self.datadir} exists and is not an initialised cluster; remove it")
        self._run([str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", self.user, "--auth=trust",
                   "--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions"])
        self._initialized = True

    def _pg_ctl_start(self, timeout: float) -> None:
        opts = (f"-p {self.port} -k {self.sockdir} -c listen_addresses={self.host} -c fsync=off "
                f"-c full_page_writes=off -c synchronous_commit=off")
        res = self._run([str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.logfile),
                         "-w", "-t", str(int(timeout)), "-o", opts, "start"], check=False, timeout=timeout + 10)
        if res.returncode != 0:
            raise RuntimeError(f"PostgreSQL did not start on port {self.port}: {res.stdout.strip()[-1000:]}\n"
                               f"{self.log_tail()}")
        deadline = time.monotonic() + timeout
        while not _accepts(self.host, self.port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not accept connections on port {self.port} in {timeout}s\n"
                                   f"{self.log_tail()}")
            time.sleep(0.05)

    def _create_database(self) -> None:
        tool = str(self.bindir / "createdb")
        if not os.access(tool, os.X_OK):
            tool = shutil.which("createdb") or tool
        res = self._run([tool, "-h", self.host, "-p", str(self.port), "-U", self.user, self.dbname], check=False)
        if res.returncode != 0 and "already exists" not in res.stdout:
            raise RuntimeError(f"createdb {self.dbname} failed: {res.stdout.strip()}")

    def _clear_stale_pidfile(self) -> None:
        """Remove the lock file of a dead postmaster that is still a zombie.

        pg_ctl daemonizes the postmaster, so after a crash it waits for PID 1 to reap
        it; until then PostgreSQL's own check (kill(pid, 0)) thinks it still runs.
        """
        pid = self._postmaster_pid()
        if pid is None or _pid_alive(pid):
            return
        deadline = time.monotonic() + 2  # give PID 1 a moment to reap it the normal way
        while time.monotonic() < deadline and _pid_exists(pid):
            time.sleep(0.05)
        if _pid_exists(pid):
            _LOG.info("postmaster %d is dead but not reaped; removing its postmaster.pid", pid)
            (self.datadir / "postmaster.pid").unlink(missing_ok=True)

    def _postmaster_pid(self) -> int | None:
        try:
            first = (self.datadir / "postmaster.pid").read_text().split("\n", 1)[0]
            return int(first)
        except (OSError, ValueError):
            return None


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc; empty where there is none)."""
    kids = []
    for entry in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(entry).read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 1 and fields[1] == str(pid):
            kids.append(int(entry.split("/")[2]))
    return kids


def _pid_alive(pid: int) -> bool:
    """Running (not a zombie waiting to be reaped)."""
    if not _pid_exists(pid):
        return False
    # pg_ctl daemonizes the postmaster, so a dead one waits for PID 1 to reap it and still answers kill(0).
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")
