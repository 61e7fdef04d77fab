"""Real signed bundles and a real HTTP server to fetch them from (tests of model updates).

Until the retrain server's packer exists, a new version is made the way the
server will: copy a trained parameters dir, optionally change it, re-sign it
with ``retrain_server.export.write_manifest`` (a later ``created_at`` gives a
new version), and tar.gz its contents at top level.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from agent.bundle import file_sha256
from retrain_server.export import write_manifest

_LOG = logging.getLogger(__name__)

__all__ = ["make_version", "pack", "tar_member", "BundleServer", "serve_bundles", "update_message",
           "flip_byte", "rewrite_array"]

# server-side files the edge does not load: left out to keep test bundles small
_NOT_SHIPPED = ("versions", "*.pkl", "two_tower_model.onnx", "manifest.json", "manifest.sig", "README.md")


def make_version(src: Path, dst: Path, signing_key: Path | None, *, created_at: datetime,
                 mutate: Callable[[Path], None] | None = None) -> str:
    """Copy ``src`` to ``dst``, apply ``mutate``, sign it anew; returns the new version."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*_NOT_SHIPPED))
    if mutate is not None:
        mutate(dst)
    old = json.loads((src / "manifest.json").read_text(encoding="utf-8"))
    doc = write_manifest(dst, metrics=old.get("metrics"), models=old.get("models"), signing_key=signing_key,
                         created_at=created_at)
    return str(doc["version"])


def tar_member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = len(data) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
    info.mode = 0o644
    return info, (io.BytesIO(data) if info.size else None)


def pack(root: Path | None, out: Path, *, extra: Iterable[tuple] = (), first: Iterable[tuple] = ()) -> Path:
    """tar.gz ``root``'s contents at top level (plus hand-made members before/after)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w:gz") as tf:
        for info, data in first:
            tf.addfile(info, data)
        if root is not None:
            for path in sorted(root.rglob("*")):
                tf.add(path, arcname=path.relative_to(root).as_posix(), recursive=False)
        for info, data in extra:
            tf.addfile(info, data)
    return out


def flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def rewrite_array(path: Path, change: Callable[[np.ndarray], np.ndarray]) -> None:
    np.save(path, change(np.load(path, allow_pickle=False)), allow_pickle=False)


def update_message(version: str, url: str, bundle: Path | None = None, **fields: Any) -> dict[str, Any]:
    """The contract §5 message for a bundle file (sha256 of the file)."""
    msg: dict[str, Any] = {"version": version, "url": url,
                           "sha256": file_sha256(bundle) if bundle is not None else "0" * 64,
                           "created_at": "2099-01-01T03:04:10+09:00", "metrics": {"guest_hr@10": 0.1}}
    msg.update(fields)
    return msg


class BundleServer:
    """Serves files of ``root`` over HTTP on a free loopback port.

    ``/bundles/NAME`` the file; ``/truncated/NAME`` announces the full length but
    sends half and closes; ``/nolength/NAME`` sends it without Content-Length; ``/drip/NAME``
    announces the full length and sends one byte every 0.2 s (a server slower than any timeout's reach);
    ``/redirect/SCHEME/NAME`` answers 302 to ``SCHEME://...``. ``requests`` counts GETs per path.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: Counter[str] = Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt: str, *args: Any) -> None:
                _LOG.debug("http: " + fmt, *args)

            def do_GET(self) -> None:
                server.requests[self.path] += 1
                parts = self.path.lstrip("/").split("/")
                if parts[0] == "redirect" and len(parts) == 3:
                    self.send_response(302)
                    self.send_header("Location", f"{parts[1]}://127.0.0.1/{parts[2]}")
                    self.end_headers()
                    return
                path = server.root / parts[-1]
                if len(parts) != 2 or not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "application/gzip")
                if parts[0] != "nolength":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if parts[0] == "drip":
                    for i in range(min(len(data), 300)):  # at most a minute, whatever the client does
                        try:
                            self.wfile.write(data[i:i + 1])
                            self.wfile.flush()
                        except OSError:
                            return
                        time.sleep(0.2)
                    return
                self.wfile.write(data[: len(data) // 2] if parts[0] == "truncated" else data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="bundle-server", daemon=True)

    def url(self, name: str, mode: str = "bundles") -> str:
        return f"http://127.0.0.1:{self.port}/{mode}/{name}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@contextmanager
def serve_bundles(root: Path) -> Iterator[BundleServer]:
    server = BundleServer(root)
    server.start()
    try:
        yield server
    finally:
        server.stop()
