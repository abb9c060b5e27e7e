"""A local certificate authority and server certificate for the secure local stack.

``ensure_certs(folder)`` creates (once) with the ``openssl`` command line:

* ``ca.crt`` / ``ca.key``: a self-signed CA, valid 30 days; point the clients at ``ca.crt``
  (``STREAMREC_KAFKA_SSL_CAFILE``, ``STREAMREC_REDIS_SSL_CA_CERTS``);
* ``server.crt`` / ``server.key``: the broker's and Redis' certificate for ``localhost`` and
  ``127.0.0.1``, signed by that CA; ``server.pem`` is key + certificate for Kafka's PEM keystore.

Local development only: the CA key sits beside the certificates.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

_EXT = """subjectAltName=DNS:localhost,IP:127.0.0.1
basicConstraints=CA:FALSE
keyUsage=digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
"""


class CertError(RuntimeError):
    """The certificates could not be made; the message says why."""


@dataclass(frozen=True)
class Certs:
    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def cert(self) -> Path:
        return self.folder / "server.crt"

    @property
    def key(self) -> Path:
        return self.folder / "server.key"

    @property
    def pem(self) -> Path:
        return self.folder / "server.pem"


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CertError(f"openssl {args[0]} failed: {proc.stderr[-800:]}")


def ensure_certs(folder: Path) -> Certs:
    """The CA and server certificate in ``folder`` (made on the first call)."""
    certs = Certs(folder)
    if certs.pem.exists() and certs.ca.exists():
        return certs
    if shutil.which("openssl") is None:
        raise CertError("openssl not found: install it (apt-get install -y openssl) for the TLS stack")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "server.ext").write_text(_EXT)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "30", "-subj", "/CN=streamrec local CA", cwd=folder)  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=localhost", cwd=folder)  # fmt: skip
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.crt", "-days", "30", "-extfile", "server.ext", cwd=folder)  # fmt: skip
    certs.pem.write_text(certs.key.read_text() + certs.cert.read_text())
    for p in (folder / "ca.key", certs.key, certs.pem):
        p.chmod(0o600)
    return certs
