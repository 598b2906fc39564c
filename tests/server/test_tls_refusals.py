"""TLS refusals (reliability check 3): an expired certificate, one for another host, one from
another CA, and plaintext to the TLS port. Each is refused by the SuperNode's own transport
(Flower's Fleet HTTP client, the code a stock ``flower-supernode`` sends with), so no Fleet
request reaches the server, and ``fedcmr-client join`` names the reason before a SuperNode starts."""

from __future__ import annotations

import datetime
import socket
import ssl
import threading
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from flwr.proto.fleet_pb2 import RegisterNodeFleetRequest  # pylint: disable=E0611
from flwr.supernode.fleet_http_client import FleetHttpClient

from client.store import LocalStore
from client.deployment import JoinSettings, NodeDeploymentError, generate_node_key, run_supernode
from server.deployment import ConsortiumDir, init_consortium
from server.pki import make_server_certificate
from shared_model.processes import certificate_problem

NOW = datetime.datetime.now(datetime.timezone.utc)
DAY = datetime.timedelta(days=1)


def _certificate(folder: ConsortiumDir, out: Path, addresses: list[str], not_before: datetime.datetime,
                 not_after: datetime.datetime) -> tuple[Path, Path]:
    """A server certificate from the consortium's own CA, with the given names and validity."""
    ca_key = serialization.load_pem_private_key(folder.tls.ca_key.read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(folder.tls.ca_cert.read_bytes())
    key, cert = make_server_certificate(ca_key, ca_cert, addresses, (not_before, not_after))  # type: ignore[arg-type]
    out.mkdir(parents=True, exist_ok=True)
    (out / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / "server.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return out / "server.crt", out / "server.key"


class TLSServer:
    """A TLS listener on loopback that records every byte a client sends after the handshake."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.received = b""
        self.handshakes = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            conn.settimeout(2.0)
            try:
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    self.handshakes += 1
                    self.received += tls.recv(65536)
            except (ssl.SSLError, OSError):
                conn.close()  # the client refused the certificate (or spoke plaintext)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.listener.close()


@pytest.fixture
def consortium(tmp_path: Path) -> ConsortiumDir:
    return init_consortium(tmp_path / "consortium", "Ours", [])


CASES = {
    "expired": (["127.0.0.1", "localhost"], NOW - 30 * DAY, NOW - DAY, "has expired"),
    "not yet valid": (["127.0.0.1", "localhost"], NOW + DAY, NOW + 30 * DAY, "is not valid yet"),
    "another host": (["fedcmr.example.org"], NOW - DAY, NOW + 30 * DAY, "is not valid for the address 127.0.0.1"),
}


def _register(port: int, ca: Path) -> None:
    """One Fleet request the way a stock SuperNode sends it (no retries)."""
    with FleetHttpClient.from_server_address(f"127.0.0.1:{port}", False, str(ca), interceptors=[]) as client:
        client.RegisterNode(RegisterNodeFleetRequest(public_key=b"probe"))


@pytest.mark.reliability(3)
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_node_sends_nothing_to_a_server_whose_certificate_fails(
        consortium: ConsortiumDir, tmp_path: Path, case: str) -> None:
    # Prepare: a server with a certificate of the consortium's own CA, but expired, not yet valid
    # or issued for another host
    addresses, not_before, not_after, reason = CASES[case]
    server = TLSServer(*_certificate(consortium, tmp_path / "bad", addresses, not_before, not_after))
    try:
        # Execute / Assert: the SuperNode's transport refuses it before any request
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            _register(server.port, consortium.tls.ca_cert)
        # Execute / Assert: join names the reason
        problem = certificate_problem("127.0.0.1", server.port, consortium.tls.ca_cert)
        assert problem is not None and reason in problem
    finally:
        server.close()
    assert server.handshakes == 0 and server.received == b""


@pytest.mark.reliability(3)
def test_the_same_transport_talks_to_a_server_with_a_good_certificate(consortium: ConsortiumDir) -> None:
    # Prepare: the certificate init made (the control for the refusals above)
    server = TLSServer(consortium.tls.server_cert, consortium.tls.server_key)
    try:
        # Execute: the listener is no HTTP server, so the request fails after it was sent
        with pytest.raises(httpx.HTTPError):
            _register(server.port, consortium.tls.ca_cert)
        assert certificate_problem("127.0.0.1", server.port, consortium.tls.ca_cert) is None
    finally:
        server.close()
    # Assert: the handshake completed and the Fleet request went out
    assert server.handshakes >= 1 and b"POST /v1/fleet/register-node" in server.received


@pytest.mark.reliability(3)
def test_another_consortiums_ca_and_a_plaintext_port_are_refused(consortium: ConsortiumDir, tmp_path: Path) -> None:
    # Prepare
    theirs = init_consortium(tmp_path / "theirs", "Theirs", [])
    server = TLSServer(consortium.tls.server_cert, consortium.tls.server_key)
    plain = socket.create_server(("127.0.0.1", 0))
    try:
        # Execute / Assert: a CA that does not vouch for the server
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            _register(server.port, theirs.tls.ca_cert)
        problem = certificate_problem("127.0.0.1", server.port, theirs.tls.ca_cert)
        assert problem is not None and "does not vouch for" in problem
        # Execute / Assert: a port that accepts but never speaks TLS is no consortium
        threading.Thread(target=lambda: plain.accept()[0].sendall(b"HTTP/1.1 200 OK\r\n\r\n"), daemon=True).start()
        problem = certificate_problem("127.0.0.1", plain.getsockname()[1], consortium.tls.ca_cert)
        assert problem is not None and "TLS handshake" in problem
    finally:
        server.close()
        plain.close()
    assert server.handshakes == 0 and server.received == b""


@pytest.mark.reliability(3)
def test_join_refuses_an_expired_certificate_before_a_supernode_starts(
        consortium: ConsortiumDir, tmp_path: Path) -> None:
    # Prepare: a hospital with a key and a store; a server with an expired certificate
    pair = generate_node_key(tmp_path / "hospital")
    store = tmp_path / "hospital" / "store"
    LocalStore.create(store, spacing_mm=1.5, crop_px=32)
    server = TLSServer(*_certificate(consortium, tmp_path / "bad", ["127.0.0.1"], NOW - 30 * DAY, NOW - DAY))
    settings = JoinSettings(server=f"127.0.0.1:{server.port}", ca_cert=consortium.tls.ca_cert, key=pair.private,
                            store=store, max_wait_s=5)
    try:
        # Execute / Assert
        with pytest.raises(NodeDeploymentError, match="has expired; the consortium must renew it"):
            run_supernode(settings)
    finally:
        server.close()
    assert server.handshakes == 0 and server.received == b""
