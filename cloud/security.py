"""The server's TLS credentials, and a development certificate authority.

The edge-facing port uses TLS (server certificate, optionally mutual TLS with a client CA); the bearer token
and the client side of TLS live in rapnet.transport, which both sides use. `make_dev_cert` writes a
self-signed CA and a server certificate for 127.0.0.1/localhost (the `cryptography` package, or openssl when
it is missing: recipe in docs/cloud.md).
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import grpc

from rapnet.transport import read_pem


# ----------------------------------------------------------------------------------------------------------
# TLS
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TLSFiles:
    """PEM files of the server: certificate chain, private key, and (for mutual TLS) the client CA."""

    cert: str
    key: str
    client_ca: str | None = None

    def server_credentials(self) -> grpc.ServerCredentials:
        cert, key = read_pem(self.cert, "certificate"), read_pem(self.key, "private key")
        ca = read_pem(self.client_ca, "client CA") if self.client_ca else None
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
        )


# ----------------------------------------------------------------------------------------------------------
# Development certificates
# ----------------------------------------------------------------------------------------------------------

DEV_NAMES = ("localhost",)
DEV_IPS = ("127.0.0.1", "::1")


@dataclass(frozen=True)
class DevCert:
    ca: Path  # ca.pem: give this to clients as their trust root
    cert: Path  # server.pem
    key: Path  # server.key
    client_cert: Path  # client.pem (for mutual TLS tests; signed by the same CA)
    client_key: Path


def make_dev_cert(out: str | os.PathLike, days: int = 30, extra_names: tuple[str, ...] = ()) -> DevCert:
    """Write a self-signed CA, a server certificate for localhost/127.0.0.1/::1 (+ extra_names) and a client
    certificate into `out`. Development only: the CA key stays next to it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        import cryptography  # noqa: F401
    except ImportError:
        _openssl_dev_cert(out, days, extra_names)
    else:
        _cryptography_dev_cert(out, days, extra_names)
    for name in ("ca.key", "server.key", "client.key"):
        os.chmod(out / name, 0o600)
    return DevCert(out / "ca.pem", out / "server.pem", out / "server.key", out / "client.pem", out / "client.key")


def _cryptography_dev_cert(out: Path, days: int, extra_names: tuple[str, ...]) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def write_key(key, path: Path) -> None:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "rapnet dev"),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder().subject_name(name("rapnet dev CA")).issuer_name(name("rapnet dev CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, usage, sans) -> tuple:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    sans = [x509.DNSName(n) for n in (*DEV_NAMES, *extra_names) if not _is_ip(n)]
    sans += [x509.IPAddress(ipaddress.ip_address(n)) for n in (*DEV_IPS, *extra_names) if _is_ip(n)]
    server_key, server_cert = leaf("localhost", ExtendedKeyUsageOID.SERVER_AUTH, sans)
    client_key, client_cert = leaf("rapnet edge (dev)", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    pem = serialization.Encoding.PEM
    write_key(ca_key, out / "ca.key")
    (out / "ca.pem").write_bytes(ca_cert.public_bytes(pem))
    write_key(server_key, out / "server.key")
    (out / "server.pem").write_bytes(server_cert.public_bytes(pem))
    write_key(client_key, out / "client.key")
    (out / "client.pem").write_bytes(client_cert.public_bytes(pem))


def _openssl_dev_cert(out: Path, days: int, extra_names: tuple[str, ...]) -> None:
    """The same with the openssl command line (the recipe docs/cloud.md shows)."""
    sans = ",".join([f"DNS:{n}" for n in (*DEV_NAMES, *extra_names) if not _is_ip(n)]
                    + [f"IP:{n}" for n in (*DEV_IPS, *extra_names) if _is_ip(n)])

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=out, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "ca.key",
        "-out", "ca.pem", "-days", str(days), "-subj", "/O=rapnet dev/CN=rapnet dev CA",
        "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for leaf, cn, ext in (("server", "localhost", f"subjectAltName={sans}\nextendedKeyUsage=serverAuth"),
                          ("client", "rapnet edge (dev)", "extendedKeyUsage=clientAuth")):
        run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", f"{leaf}.key",
            "-out", f"{leaf}.csr", "-subj", f"/O=rapnet dev/CN={cn}")
        (out / f"{leaf}.ext").write_text(f"basicConstraints=critical,CA:FALSE\n{ext}\n")
        run("x509", "-req", "-in", f"{leaf}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{leaf}.pem", "-days", str(days), "-sha256", "-extfile", f"{leaf}.ext")
        (out / f"{leaf}.csr").unlink()
        (out / f"{leaf}.ext").unlink()


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False
