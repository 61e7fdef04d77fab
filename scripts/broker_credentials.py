"""Set up a store's MQTT security: a CA, broker and client certificates, users, passwords, the ACL.

Run once per store (again to add baskets: give the whole store each time; the CA
and existing passwords are kept), then install what it wrote (README "Security")::

    python -m scripts.broker_credentials --out /root/store-17-mqtt --prefix smartbasket/store-17 \\
        --broker-host broker.store-17.lan --broker-ip 10.17.0.2 \\
        --agents jetson-01,jetson-02 --baskets b-1,b-2 --displays b-1,b-2

It writes (keys and passwords mode 600, the directory 700)::

    ca/ca.crt ca/ca.key                    the store's CA (keep ca.key offline)
    broker/certs/ca.crt server.crt server.key   -> /etc/mosquitto/certs/
    broker/smartbasket.passwd              -> /etc/mosquitto/smartbasket.passwd (mosquitto_passwd format)
    broker/smartbasket.acl                 -> /etc/mosquitto/smartbasket.acl
    clients/<user>/ca.crt client.crt client.key password   one directory per MQTT user
    clients/<user>/<agent|retrain|...>.env the environment file of that program (username, password)

Users, one per MQTT connection, because the broker's TLS listener gives each connection
its user name as client id (``use_username_as_clientid``, config/mosquitto-secure.conf),
so nobody can take over another's session:

    retrain              publishes PREFIX/models/updated; reads PREFIX/agent/+/status (console)
    agent-ID             the agent's events connection: reads carts and models/updated, writes
                         its own status (and Last Will); reads $SYS/broker/publish/messages/dropped
    agent-ID-out         the agent's answers connection (same password): writes recommendations, errors
    basket-ID            a basket's sensors: write their own cart, read their own errors
    display-ID           a basket's screen: reads its own recommendations
    bridge-ID            a standalone HTTP bridge following model updates: reads models/updated

The password file is written with ``mosquitto_passwd`` (in the mosquitto package).
"""

from __future__ import annotations

import argparse
import datetime as dt
import grp
import ipaddress
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_LOG = logging.getLogger(__name__)

__all__ = ["User", "store_users", "render_acl", "write_store", "make_ca", "issue_certificate", "write_password_file",
           "find_mosquitto_passwd", "main", "PASSWD_NAME", "ACL_NAME"]

PASSWD_NAME = "smartbasket.passwd"
ACL_NAME = "smartbasket.acl"
_CA_DAYS = 3650
_CERT_DAYS = 825  # what browsers and most TLS stacks still accept for a leaf certificate
_FORBIDDEN = set("/+#\x00: \t\r\n")


@dataclass(frozen=True)
class User:
    """One MQTT user: its name, its role, its grants (``("read" | "write", topic)``) and its program's env file."""

    name: str
    role: str
    grants: tuple[tuple[str, str], ...]
    env_file: str | None = None  # e.g. "agent.env": BASKET_MQTT_USERNAME / BASKET_MQTT_PASSWORD


def _check_id(kind: str, value: str) -> str:
    if not value or any(c in _FORBIDDEN for c in value) or len(value) > 64:
        raise ValueError(f"{kind} id {value!r}: 1-64 characters, no '/', '+', '#', ':' or spaces")
    return value


def store_users(prefix: str, *, agents: Iterable[str] = (), baskets: Iterable[str] = (),
                displays: Iterable[str] = (), bridges: Iterable[str] = (), retrain: bool = True) -> list[User]:
    """Every user of a store and what it may do (module docstring); raises ValueError for a bad id."""
    p = prefix.strip("/")
    if not p or any(c in p for c in "+#\x00 "):
        raise ValueError(f"bad topic prefix {prefix!r}")
    users: list[User] = []
    if retrain:
        users.append(User("retrain", "retrain", (("write", f"{p}/models/updated"), ("read", f"{p}/agent/+/status")),
                          "retrain.env"))
    for a in agents:
        _check_id("agent", a)
        users.append(User(f"agent-{a}", "agent", (
            ("read", f"{p}/basket/+/cart"), ("read", f"{p}/models/updated"), ("write", f"{p}/agent/{a}/status"),
            ("read", "$SYS/broker/publish/messages/dropped")), "agent.env"))
        users.append(User(f"agent-{a}-out", "agent-out", (
            ("write", f"{p}/basket/+/recommendations"), ("write", f"{p}/basket/+/errors"))))
    for b in baskets:
        _check_id("basket", b)
        users.append(User(f"basket-{b}", "basket", (("write", f"{p}/basket/{b}/cart"),
                                                     ("read", f"{p}/basket/{b}/errors"))))
    for d in displays:
        _check_id("display", d)
        users.append(User(f"display-{d}", "display", (("read", f"{p}/basket/{d}/recommendations"),)))
    for br in bridges:
        _check_id("bridge", br)
        users.append(User(f"bridge-{br}", "bridge", (("read", f"{p}/models/updated"),), "bridge.env"))
    names = [u.name for u in users]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"two users would be called {', '.join(dupes)}: rename an agent, basket or display")
    return users


def render_acl(users: Sequence[User], prefix: str) -> str:
    """The Mosquitto ACL file: one ``user`` block per user, nothing for anyone else (deny by default)."""
    lines = [
        "# Smart Basket MQTT ACL (Mosquitto acl_file), written by scripts/broker_credentials.py.",
        f"# Topic prefix: {prefix.strip('/')}. Each user may do exactly what is listed under it; anything",
        "# else is refused (a refused publish is dropped, a refused subscription delivers nothing).",
        "# The TLS listener makes each connection's client id its user name (use_username_as_clientid),",
        "# so a user's session cannot be taken over with another user's password.",
        "",
    ]
    for u in users:
        lines.append(f"# {u.role}")
        lines.append(f"user {u.name}")
        lines += [f"topic {access} {topic}" for access, topic in u.grants]
        lines.append("")
    return "\n".join(lines)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(directory: Path,
            name: str = "Smart Basket store CA") -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The store's CA in ``directory`` (ca.crt, ca.key): reused when it exists, so issued certificates stay valid."""
    crt, key_path = directory / "ca.crt", directory / "ca.key"
    if crt.is_file() and key_path.is_file():
        cert = x509.load_pem_x509_certificate(crt.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cert, key
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=_CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    _write_private(key_path, _pem_key(key))
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def issue_certificate(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], common_name: str, *,
                      server: bool = False, dns: Sequence[str] = (), ips: Sequence[str] = (),
                      days: int = _CERT_DAYS) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) signed by ``ca``: a server certificate (with these names) or a client's."""
    ca_cert, ca_key = ca
    key = _key()
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
               .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                     else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    if server:
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dict.fromkeys(dns)]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in dict.fromkeys(ips)]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def find_mosquitto_passwd() -> str:
    found = shutil.which("mosquitto_passwd")
    for candidate in (found, "/usr/bin/mosquitto_passwd", "/usr/local/bin/mosquitto_passwd"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError("mosquitto_passwd not found: it comes with the mosquitto package (apt-get install mosquitto)")


def write_password_file(path: Path, passwords: dict[str, str]) -> None:
    """A Mosquitto password file (salted PBKDF2-SHA512 hashes) made by ``mosquitto_passwd -b``.

    Passwords go to mosquitto_passwd as arguments of a short-lived child of this
    process: run this on the store's admin machine, not on a shared host.
    """
    tool = find_mosquitto_passwd()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "passwd"
        work.touch(mode=0o600)
        for user, password in passwords.items():
            r = subprocess.run([tool, "-b", str(work), user, password], capture_output=True, text=True, timeout=30)
            if r.returncode != 0:
                raise RuntimeError(f"mosquitto_passwd failed for {user}: {r.stderr.strip() or r.stdout.strip()}")
        _write_private(path, work.read_bytes(), 0o640)


def _env_lines(user: User, password: str) -> str:
    if user.env_file == "retrain.env":
        return f"RETRAIN_MQTT_USERNAME={user.name}\nRETRAIN_MQTT_PASSWORD={password}\n"
    return f"BASKET_MQTT_USERNAME={user.name}\nBASKET_MQTT_PASSWORD={password}\n"


def _group_to(paths: Iterable[Path], group: str | None) -> None:
    """Give the broker's files to the group the broker runs as (it reads them after dropping root)."""
    if group is None or os.geteuid() != 0:
        return
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        return
    for p in paths:
        os.chown(p, 0, gid)


def write_store(out: Path, users: Sequence[User], prefix: str, *, broker_hosts: Sequence[str] = ("localhost",),
                broker_ips: Sequence[str] = ("127.0.0.1",), broker_group: str | None = "mosquitto") -> dict[str, str]:
    """Write every file of the module docstring into ``out``; returns user -> password (new or kept)."""
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    ca = make_ca(out / "ca")
    ca_pem = (out / "ca" / "ca.crt").read_bytes()
    broker = out / "broker"
    certs = broker / "certs"
    certs.mkdir(parents=True, exist_ok=True)
    os.chmod(broker, 0o750)
    os.chmod(certs, 0o750)
    server_crt, server_key = issue_certificate(ca, broker_hosts[0] if broker_hosts else "localhost", server=True,
                                               dns=[*broker_hosts, "localhost"], ips=[*broker_ips, "127.0.0.1"])
    (certs / "ca.crt").write_bytes(ca_pem)
    (certs / "server.crt").write_bytes(server_crt)
    _write_private(certs / "server.key", server_key, 0o640)
    passwords: dict[str, str] = {}
    for u in users:
        d = out / "clients" / u.name
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        pw_file = d / "password"
        password = pw_file.read_text(encoding="utf-8").strip() if pw_file.is_file() else ""
        if not password:
            password = secrets.token_urlsafe(24)
            _write_private(pw_file, (password + "\n").encode())
        if u.role == "agent-out":  # the agent logs in twice with one secret: as agent-ID and agent-ID-out
            password = passwords[u.name[: -len("-out")]]
            _write_private(pw_file, (password + "\n").encode())
        passwords[u.name] = password
        crt, key = issue_certificate(ca, u.name)
        (d / "ca.crt").write_bytes(ca_pem)
        (d / "client.crt").write_bytes(crt)
        _write_private(d / "client.key", key)
        if u.env_file:
            _write_private(d / u.env_file, _env_lines(u, password).encode())
    write_password_file(broker / PASSWD_NAME, passwords)
    (broker / ACL_NAME).write_text(render_acl(users, prefix), encoding="utf-8")
    os.chmod(broker / ACL_NAME, 0o640)
    _group_to([broker, certs, certs / "server.key", broker / PASSWD_NAME, broker / ACL_NAME], broker_group)
    return passwords


def _ids(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.broker_credentials", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="directory to write into (kept: CA, passwords)")
    ap.add_argument("--prefix", default="smartbasket", help="the store's topic prefix, e.g. smartbasket/store-17")
    ap.add_argument("--agents", help="agent ids, comma-separated (agent_id in agent.yaml)")
    ap.add_argument("--baskets", help="basket ids whose sensors publish carts")
    ap.add_argument("--displays", help="basket ids whose screens read recommendations over MQTT")
    ap.add_argument("--bridges", help="ids of standalone HTTP bridges that follow model updates")
    ap.add_argument("--no-retrain", action="store_true", help="no user for the retrain server")
    ap.add_argument("--broker-host", action="append", default=[], help="DNS name clients use for the broker "
                    "(repeatable; the first is the certificate's CN)")
    ap.add_argument("--broker-ip", action="append", default=[], help="IP address clients use (repeatable)")
    ap.add_argument("--broker-group", default="mosquitto", help="group the broker runs as (when run as root)")
    args = ap.parse_args(argv)
    try:
        users = store_users(args.prefix, agents=_ids(args.agents), baskets=_ids(args.baskets),
                            displays=_ids(args.displays), bridges=_ids(args.bridges), retrain=not args.no_retrain)
        write_store(args.out, users, args.prefix, broker_hosts=args.broker_host or ["localhost"],
                    broker_ips=args.broker_ip or ["127.0.0.1"], broker_group=args.broker_group)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"broker_credentials: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(users)} users for prefix {args.prefix.strip('/')} to {args.out}: "
          f"{', '.join(u.name for u in users)}")
    print(f"broker: install -m 640 -o root -g mosquitto {args.out}/broker/{{{PASSWD_NAME},{ACL_NAME}}} "
          "/etc/mosquitto/ ; certs -> /etc/mosquitto/certs/ (server.key mode 640, group mosquitto); "
          "see README \"Security\"")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
