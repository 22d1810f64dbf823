"""Throw-away TLS material for tests: a CA, a server certificate (for ``localhost`` and
``127.0.0.1`` by default) and a client certificate, made with the ``openssl`` CLI (EC
P-256, valid 1 day).

    make_test_certs(tmp_path)  # writes ca.pem, server.pem/.key, client.pem/.key
"""

from __future__ import annotations

import subprocess
from pathlib import Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_test_certs(directory: Path, server_san: str = "DNS:localhost,IP:127.0.0.1") -> None:
    """Writes ``ca.pem``/``ca.key``, ``server.pem``/``server.key`` (subject alternative
    names ``server_san``) and ``client.pem``/``client.key`` into ``directory``."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=test-ca", cwd=directory)  # fmt: skip
    for name, san in (("server", server_san), ("client", "DNS:client")):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=directory)  # fmt: skip
        (directory / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "1",
                 "-extfile", f"{name}.ext", cwd=directory)  # fmt: skip
