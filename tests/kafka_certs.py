"""Certificates made at test time with `cryptography`: a CA, server certificates for 127.0.0.1
and localhost (valid, expired, for the wrong host), client certificates (valid, expired, signed
by a CA the broker does not know).

Keys are written unencrypted in PKCS#8 PEM, the form both Apache Kafka's PEM key stores
(`ssl.keystore.type=PEM`) and Python's ssl module read.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CertificateAuthority", "IssuedCert", "https_files"]

_DAY = datetime.timedelta(days=1)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vaewatch tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san(hosts: tuple[str, ...]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


@dataclass(frozen=True)
class IssuedCert:
    """A leaf certificate and its key, as PEM."""

    cert_pem: bytes
    key_pem: bytes

    def write(self, folder: Path, stem: str) -> tuple[Path, Path]:
        """STEM.crt (the certificate) and STEM.key; returns both paths."""
        cert, key = folder / f"{stem}.crt", folder / f"{stem}.key"
        cert.write_bytes(self.cert_pem)
        key.write_bytes(self.key_pem)
        key.chmod(0o600)
        return cert, key

    def write_keystore(self, path: Path) -> Path:
        """One PEM file with the key and then the certificate: a Kafka PEM key store."""
        path.write_bytes(self.key_pem + self.cert_pem)
        path.chmod(0o600)
        return path


class CertificateAuthority:
    """A self-signed CA that issues server and client certificates."""

    def __init__(self, name: str = "vaewatch test CA") -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        subject = _name(name)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY)
            .not_valid_after(now + 30 * _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._key, hashes.SHA256())
        )

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write(self, path: Path) -> Path:
        path.write_bytes(self.cert_pem)
        return path

    def issue(
        self,
        common_name: str,
        *,
        hosts: tuple[str, ...] = (),
        expired: bool = False,
    ) -> IssuedCert:
        """A certificate for `common_name`, valid for server and client authentication, naming
        `hosts` (IP addresses or DNS names) as its subject alternative names; `expired`: its
        validity ended yesterday."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        not_before, not_after = (
            (now - 10 * _DAY, now - _DAY) if expired else (now - _DAY, now + 30 * _DAY)
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if hosts:
            builder = builder.add_extension(_san(hosts), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        return IssuedCert(
            cert_pem=cert.public_bytes(serialization.Encoding.PEM), key_pem=_key_pem(key)
        )


def https_files(folder: Path, *, server: str, client: str) -> dict[str, Path]:
    """A CA (`ca`), a server certificate for 127.0.0.1 (`cert`, `key`) and a client
    certificate (`client_cert`, `client_key`) it signed, and another CA's certificate
    (`other_ca`), as files in `folder`."""
    ca = CertificateAuthority()
    files = {"ca": ca.write(folder / "ca.crt")}
    files["cert"], files["key"] = ca.issue(server, hosts=("127.0.0.1",)).write(folder, "server")
    files["client_cert"], files["client_key"] = ca.issue(client).write(folder, "client")
    files["other_ca"] = CertificateAuthority("another CA").write(folder / "other-ca.crt")
    return files
