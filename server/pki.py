"""The consortium's keys: a CA, the SuperLink's TLS certificate and the app-signing key.

Made with the ``cryptography`` package, in the formats the stock Flower binaries read:

- TLS: PEM certificates and PKCS#8 PEM keys, ``flower-superlink --ssl-ca-certfile --ssl-certfile
  --ssl-keyfile``; hospitals verify the SuperLink with the CA certificate alone
  (``flower-supernode --root-certificates``). The SuperLink certificate names every address a
  node may dial (subject alternative names), so a node rejects any other server.
- App signing: an Ed25519 key, the public half as an OpenSSH line under a ``fpk_...`` id in a
  ``--trusted-entities`` YAML file, the shape ``flower-supernode`` checks app signatures with.

Private keys are written with mode 0600 and never replaced (:func:`~shared_model.files.write_secret`).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared_model.errors import UserError
from shared_model.files import write_public, write_secret

CA_DAYS = 3650  # the consortium CA outlives its server certificates
SERVER_DAYS = 825  # the longest server certificate lifetime browsers and TLS stacks still accept
DEFAULT_ADDRESSES = ("127.0.0.1", "localhost")


class PKIError(UserError, ValueError):
    """A certificate, key or address the consortium's PKI cannot use."""


@dataclass(frozen=True)
class CertificatePaths:
    """Where ``init`` writes the consortium's TLS material."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def subject_alternative_names(addresses: Sequence[str]) -> list[x509.GeneralName]:
    """IP addresses as IP SANs, everything else as DNS names; a port or URL is an error."""
    names: list[x509.GeneralName] = []
    for address in dict.fromkeys(addresses):  # keep order, drop repeats
        if not address or (any(c in address for c in "/ :") and not _is_ip(address)):
            raise PKIError(f"--address '{address}' must be a bare host name or IP address "
                           "(no port, no scheme), e.g. --address fedcmr.example.org")
        names.append(x509.IPAddress(ipaddress.ip_address(address)) if _is_ip(address)
                     else x509.DNSName(address))
    return names


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


Validity = tuple[datetime.datetime, datetime.datetime]  # not before, not after (UTC)


def valid_for(days: int) -> Validity:
    """From five minutes ago (tolerating clock skew) to ``days`` from now."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey,
             validity: Validity) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(validity[0]).not_valid_after(validity[1]))


def make_ca(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA that may sign server certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
                         x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
    cert = (_builder(subject, subject, key.public_key(), valid_for(CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA384()))
    return key, cert


def make_server_certificate(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                            addresses: Sequence[str], validity: Validity | None = None,
                            ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The SuperLink's TLS certificate, valid for exactly ``addresses`` (SANs), for
    ``SERVER_DAYS`` from now unless ``validity`` says otherwise."""
    key = ec.generate_private_key(ec.SECP256R1())
    sans = subject_alternative_names(addresses)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(addresses[0]))])
    cert = (_builder(subject, ca_cert.subject, key.public_key(), validity or valid_for(SERVER_DAYS))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA384()))
    return key, cert


def write_tls(paths: CertificatePaths, name: str, addresses: Sequence[str]) -> None:
    """Create the CA and the SuperLink certificate; keys 0600, never over existing files."""
    ca_key, ca_cert = make_ca(name)
    server_key, server_cert = make_server_certificate(ca_key, ca_cert, addresses)
    write_secret(paths.ca_key, _private_pem(ca_key))
    write_secret(paths.server_key, _private_pem(server_key))
    write_public(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    write_public(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))


def certificate_addresses(cert_path: Path) -> list[str]:
    """The host names and IP addresses a certificate is valid for."""
    cert = load_certificate(cert_path)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [*sans.get_values_for_type(x509.DNSName),
            *(str(ip) for ip in sans.get_values_for_type(x509.IPAddress))]


def load_certificate(path: Path) -> x509.Certificate:
    """A PEM certificate, or an error naming the file."""
    if not path.is_file():
        raise PKIError(f"certificate {path} does not exist")
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError:
        raise PKIError(f"{path} is not a PEM certificate") from None


def signing_key_id(public_line: str) -> str:
    """A stable ``fpk_`` id for a public key (the key's SHA-256, as Flower names trusted entities)."""
    return "fpk_" + hashlib.sha256(public_line.split()[1].encode()).hexdigest()[:32]


def write_signing_key(private_path: Path, public_path: Path, trusted_entities: Path) -> str:
    """The consortium's Ed25519 app-signing key; returns its ``fpk_`` id.

    ``trusted_entities`` is the file a hospital passes to ``flower-supernode --trusted-entities``.
    """
    key = ed25519.Ed25519PrivateKey.generate()
    write_secret(private_path, key.private_bytes(serialization.Encoding.PEM,
                                                 serialization.PrivateFormat.OpenSSH,
                                                 serialization.NoEncryption()))
    public_line = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                serialization.PublicFormat.OpenSSH).decode()
    write_public(public_path, f"{public_line} fedcmr-consortium\n".encode())
    key_id = signing_key_id(public_line)
    write_public(trusted_entities, f"{key_id}: '{public_line}'\n".encode())
    return key_id
