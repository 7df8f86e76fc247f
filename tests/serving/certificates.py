"""Certificates for the TLS tests, made by `openssl` in a directory: a CA, a server
certificate for 127.0.0.1/localhost, a client certificate, a client certificate from another
CA, and an expired client certificate from the right CA."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_client_cert: Path  # signed by another CA
    other_client_key: Path
    expired_client_cert: Path  # signed by `ca`, valid in January 2020 only
    expired_client_key: Path


def openssl(directory: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)


def authority(directory: Path, name: str) -> tuple[Path, Path]:
    openssl(directory, "req", "-x509", *EC, "-keyout", f"{name}.key", "-out", f"{name}.pem",
            "-days", "2", "-subj", f"/CN={name}")  # fmt: skip
    return directory / f"{name}.pem", directory / f"{name}.key"


def signed(directory: Path, name: str, ca: str, usage: str) -> tuple[Path, Path]:
    """A key and a certificate for `name`, signed by authority `ca`."""
    extensions = directory / f"{name}.ext"
    if usage == "server":
        extensions.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                              "extendedKeyUsage=serverAuth\n")  # fmt: skip
    else:
        extensions.write_text("extendedKeyUsage=clientAuth\n")
    openssl(directory, "req", *EC, "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")  # fmt: skip
    openssl(directory, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem",
            "-CAkey", f"{ca}.key", "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
            "-extfile", extensions.name)  # fmt: skip
    return directory / f"{name}.pem", directory / f"{name}.key"


def expired(directory: Path, name: str, ca: str) -> tuple[Path, Path]:
    """A client certificate `ca` signed, valid only in January 2020 (`openssl ca` sets the
    dates where `x509 -req` cannot)."""
    (directory / "index.txt").write_text("")
    (directory / "serial").write_text("1000\n")
    (directory / "ca.cnf").write_text(
        "[ca]\ndefault_ca = test\n[test]\ndir = .\ndatabase = index.txt\nnew_certs_dir = .\n"
        f"serial = serial\ncertificate = {ca}.pem\nprivate_key = {ca}.key\n"
        "default_md = sha256\npolicy = anything\nunique_subject = no\n"
        "[anything]\ncommonName = supplied\n"
    )
    openssl(directory, "req", *EC, "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")  # fmt: skip
    openssl(directory, "ca", "-batch", "-config", "ca.cnf", "-in", f"{name}.csr",
            "-out", f"{name}.pem", "-startdate", "200101000000Z", "-enddate", "200131000000Z",
            "-notext")  # fmt: skip
    return directory / f"{name}.pem", directory / f"{name}.key"


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca, _ = authority(directory, "ca")
    authority(directory, "other-ca")
    server = signed(directory, "server", "ca", "server")
    client = signed(directory, "client", "ca", "client")
    other = signed(directory, "other-client", "other-ca", "client")
    old = expired(directory, "expired-client", "ca")
    return Pki(ca, *server, *client, *other, *old)
