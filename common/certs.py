"""Key material for a deployment: a private CA, the SuperLink's TLS certificate, and one
SuperNode authentication key pair per hospital (ECDSA P-384, OpenSSH format, as Flower
expects). Everything is written with owner-only permissions where it is secret.

Layout under the output folder::

    ca.crt, ca.key                      the federation's CA (keep ca.key offline)
    superlink/server.crt, server.key    TLS for the SuperLink (SANs: the given hosts)
    superlink/provenance_ed25519.pem    the key signing the provenance log
    hospitals/<name>/node_key           SuperNode private key (stays at the hospital)
    hospitals/<name>/node_key.pub       registered with `flwr supernode register`
    hospitals/<name>/ca.crt             what the hospital trusts
    hospitals/<name>/provenance.pub     the log-signing key the hospital pins
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from common.provenance.log import load_or_create_key
from common.provenance.records import public_pem

HOSPITAL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
CA_FILE = "ca.crt"
NODE_KEY_FILE = "node_key"
PROVENANCE_PUBLIC_FILE = "provenance.pub"


class CertificateError(ValueError):
    """Bad input for key generation (names, hosts, an existing folder)."""


@dataclass(frozen=True)
class DeploymentKeys:
    root: Path

    @property
    def ca_certificate(self) -> Path:
        return self.root / CA_FILE

    @property
    def server_certificate(self) -> Path:
        return self.root / "superlink" / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "superlink" / "server.key"

    @property
    def provenance_key(self) -> Path:
        return self.root / "superlink" / "provenance_ed25519.pem"

    def hospital_dir(self, name: str) -> Path:
        return self.root / "hospitals" / name

    def node_private_key(self, name: str) -> Path:
        return self.hospital_dir(name) / NODE_KEY_FILE

    def node_public_key(self, name: str) -> Path:
        return self.hospital_dir(name) / f"{NODE_KEY_FILE}.pub"


def _write(path: Path, data: bytes, *, secret: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _certificate(subject: str, public_key, issuer: x509.Name, signer, *, days: int, ca: bool, hosts=()) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
    return builder.sign(signer, hashes.SHA384())


def generate_deployment_keys(
    root: Path, *, hospitals: list[str], server_hosts: list[str], days: int = 365, overwrite: bool = False
) -> DeploymentKeys:
    """Create the CA, the SuperLink certificate and each hospital's SuperNode key pair."""
    bad = [name for name in hospitals if not HOSPITAL_NAME.match(name)]
    if bad or not hospitals:
        raise CertificateError(f"hospital names must match {HOSPITAL_NAME.pattern}, got {bad or 'none'}")
    if len(set(hospitals)) != len(hospitals):
        raise CertificateError(f"hospital names repeat: {sorted(hospitals)}")
    if not server_hosts:
        raise CertificateError("name at least one host the SuperLink is reached at (e.g. superlink, 127.0.0.1)")
    keys = DeploymentKeys(root)
    if keys.ca_certificate.exists() and not overwrite:
        raise CertificateError(f"{root} already holds a CA; pass --overwrite to replace every key in it")
    if overwrite:
        keys.provenance_key.unlink(missing_ok=True)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "causalfed federation CA")])
    ca_cert = _certificate("causalfed federation CA", ca_key.public_key(), ca_name, ca_key, days=days, ca=True)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    _write(keys.ca_certificate, ca_pem, secret=False)
    _write(root / "ca.key", _pem_key(ca_key), secret=True)

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = _certificate(server_hosts[0], server_key.public_key(), ca_name, ca_key, days=days, ca=False, hosts=server_hosts)
    _write(keys.server_certificate, server_cert.public_bytes(serialization.Encoding.PEM), secret=False)
    _write(keys.server_key, _pem_key(server_key), secret=True)

    signing_key = load_or_create_key(keys.provenance_key)
    for name in hospitals:
        _write(keys.hospital_dir(name) / PROVENANCE_PUBLIC_FILE, public_pem(signing_key.public_key()), secret=False)
        node_key = ec.generate_private_key(ec.SECP384R1())
        private = node_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        public = node_key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        _write(keys.node_private_key(name), private, secret=True)
        _write(keys.node_public_key(name), public + f" {name}\n".encode(), secret=False)
        _write(keys.hospital_dir(name) / CA_FILE, ca_pem, secret=False)
    return keys
