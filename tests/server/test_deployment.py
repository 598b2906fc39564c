"""The consortium's deployment folder without a running SuperLink: keys, certificates, refusals."""

import json
import os
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from typer.testing import CliRunner

from server import cli as server_cli
from server.deployment import (
    ConsortiumDir,
    DeploymentError,
    RunRequest,
    admit_node,
    init_consortium,
    running_link,
    start_superlink,
)
from server.pki import PKIError, certificate_addresses
from shared_model.errors import UserError
from shared_model.processes import LaunchError, flower_binary, tls_answers


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_makes_a_ca_a_server_certificate_and_a_signing_key(tmp_path: Path) -> None:
    # Execute
    folder = init_consortium(tmp_path / "c", "Test consortium", ["fedcmr.example.org", "10.0.0.5"])
    # Assert: the layout, private keys 0600, the certificate chain and the names it serves
    for sub in ("state", "runs", "releases", "logs"):
        assert (folder.root / sub).is_dir()
    assert all(_mode(key) == 0o600 for key in folder.private_keys())
    assert _mode(folder.tls.ca_cert) == 0o644
    ca = x509.load_pem_x509_certificate(folder.tls.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(folder.tls.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert set(certificate_addresses(folder.tls.server_cert)) == {
        "127.0.0.1", "localhost", "fedcmr.example.org", "10.0.0.5"}
    key = serialization.load_pem_private_key(folder.tls.server_key.read_bytes(), None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()


def test_the_trusted_entities_file_has_the_shape_flower_supernode_reads(tmp_path: Path) -> None:
    # Prepare
    folder = init_consortium(tmp_path / "c", "Test consortium", [])
    # Execute
    entities = yaml.safe_load((folder.signing / "trusted-entities.yaml").read_text())
    # Assert: one fpk_ id -> an OpenSSH Ed25519 public key matching the private signing key
    ((key_id, line),) = entities.items()
    assert key_id.startswith("fpk_")
    public = serialization.load_ssh_public_key(line.encode())
    private = serialization.load_ssh_private_key((folder.signing / "consortium-app.key").read_bytes(), None)
    assert isinstance(public, ed25519.Ed25519PublicKey) and isinstance(private, ed25519.Ed25519PrivateKey)
    assert public.public_bytes_raw() == private.public_key().public_bytes_raw()


def test_init_refuses_to_overwrite_a_consortium(tmp_path: Path) -> None:
    # Prepare
    folder = init_consortium(tmp_path / "c", "Test consortium", [])
    before = {key: key.read_bytes() for key in folder.private_keys()}
    # Execute
    result = CliRunner().invoke(server_cli.app, ["init", str(folder.root)])
    # Assert: one line, exit status 2, the keys untouched
    assert result.exit_code == 2
    assert "refusing to overwrite" in result.output and "Traceback" not in result.output
    assert {key: key.read_bytes() for key in folder.private_keys()} == before


@pytest.mark.parametrize("address", ["fedcmr.example.org:9092", "https://fedcmr.example.org", ""])
def test_an_address_with_a_port_or_scheme_is_refused(tmp_path: Path, address: str) -> None:
    with pytest.raises(PKIError, match="bare host name"):
        init_consortium(tmp_path / "c", "Test consortium", [address])


def _serve_tls_once(folder: ConsortiumDir) -> tuple[int, threading.Thread]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder.tls.server_cert, folder.tls.server_key)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass  # the client refused our certificate

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname()[1], thread


@pytest.mark.reliability(3)
def test_a_node_trusts_the_superlink_with_its_consortium_ca_only(tmp_path: Path) -> None:
    # Prepare: two consortia; a TLS server with the first one's SuperLink certificate
    ours = init_consortium(tmp_path / "ours", "Ours", [])
    theirs = init_consortium(tmp_path / "theirs", "Theirs", [])
    port, thread = _serve_tls_once(ours)
    port2, thread2 = _serve_tls_once(ours)
    # Execute
    trusted = tls_answers("127.0.0.1", port, ours.tls.ca_cert, "127.0.0.1")
    foreign = tls_answers("127.0.0.1", port2, theirs.tls.ca_cert, "127.0.0.1")
    thread.join(5)
    thread2.join(5)
    # Assert
    assert trusted and not foreign


def test_admit_checks_the_key_and_the_superlink_before_asking_flower(tmp_path: Path) -> None:
    # Prepare
    folder = init_consortium(tmp_path / "c", "Test consortium", [])
    rsa_key = tmp_path / "rsa.pub"
    rsa_key.write_bytes(rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
                        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    ec_key = tmp_path / "node.pub"
    ec_key.write_bytes(ec.generate_private_key(ec.SECP384R1()).public_key()
                       .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    # Execute / Assert
    with pytest.raises(DeploymentError, match="does not exist"):
        admit_node(folder, tmp_path / "missing.pub", "hospital-a")
    with pytest.raises(DeploymentError, match="not an EC key"):
        admit_node(folder, rsa_key, "hospital-a")
    with pytest.raises(DeploymentError, match="not an OpenSSH public key"):
        admit_node(folder, folder.tls.ca_cert, "hospital-a")
    with pytest.raises(DeploymentError, match="letters, digits"):
        admit_node(folder, ec_key, "hospital a; rm -rf")
    with pytest.raises(DeploymentError, match="fedcmr-server start"):
        admit_node(folder, ec_key, "hospital-a")


def test_start_refuses_a_folder_without_a_consortium_and_a_busy_port(tmp_path: Path) -> None:
    # Prepare
    folder = init_consortium(tmp_path / "c", "Test consortium", [])
    busy = socket.create_server(("127.0.0.1", 0))
    # Execute / Assert
    with busy:
        with pytest.raises(DeploymentError, match="fedcmr-server init"):
            start_superlink(ConsortiumDir(tmp_path / "empty"), port=busy.getsockname()[1])
        with pytest.raises(LaunchError, match="is busy"):
            start_superlink(folder, port=busy.getsockname()[1])
        with pytest.raises(DeploymentError, match="does not name 10.9.9.9"):
            start_superlink(folder, host="10.9.9.9", port=busy.getsockname()[1])
    assert not folder.link_file.exists()


def test_a_missing_flower_binary_is_a_user_error() -> None:
    with pytest.raises(UserError, match="not installed"):
        flower_binary("flower-no-such-binary")


def test_admin_commands_print_one_line_errors(tmp_path: Path) -> None:
    # Execute
    result = CliRunner().invoke(server_cli.app, ["admit", str(tmp_path / "k.pub"), "--name", "a",
                                                 "--dir", str(tmp_path)])
    # Assert
    assert result.exit_code == 2 and "not a consortium folder" in result.output
    assert "Traceback" not in result.output


def test_a_stale_pid_file_is_never_taken_for_a_running_superlink(tmp_path: Path) -> None:
    # Prepare: the pid file names a live process that is not a SuperLink (this test's own)
    folder = init_consortium(tmp_path / "c", "Test consortium", [])
    folder.link_file.write_text(f'{{"pid": {os.getpid()}, "host": "127.0.0.1", "port": 9092}}\n')
    # Execute
    result = CliRunner().invoke(server_cli.app, ["stop", str(folder.root)])
    # Assert: nothing was signalled (this process still runs the test) and the file is gone
    assert running_link(folder) is None
    assert result.exit_code == 0 and "no SuperLink was running" in result.output
    assert not folder.link_file.exists()


@pytest.mark.parametrize("revoked, fragment", [(None, "already admitted as site"), ("2026-01-01", "stays revoked")])
@pytest.mark.reliability(1)
def test_a_key_is_admitted_once_and_a_revoked_key_never_again(tmp_path: Path, revoked, fragment) -> None:
    # Prepare: the registry already holds this key under another site
    folder = init_consortium(tmp_path / "c", "Test consortium", [])
    key = tmp_path / "node.pub"
    key.write_bytes(ec.generate_private_key(ec.SECP384R1()).public_key()
                    .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    entry = {"public_key": key.read_text().strip(), "node_id": 7, "admitted": "2025-12-01"}
    folder.nodes_file.write_text(json.dumps({"hospital-a": {**entry, **({"revoked": revoked} if revoked else {})}}))
    # Execute / Assert: refused before any SuperLink is asked
    with pytest.raises(DeploymentError, match=fragment):
        admit_node(folder, key, "hospital-b")


def _request(**change) -> RunRequest:
    return RunRequest(**{"preset": "demo-cpu", "name": "r1", "overrides": ("federation.min_sites=2",),
                         **change})


def test_a_run_request_becomes_flowers_run_config(tmp_path: Path) -> None:
    from server.deployment import resolved_request

    folder = init_consortium(tmp_path / "c", "Test consortium", [])
    run_config, cfg = resolved_request(folder, _request(overrides=("federation.min_sites=2", "federation.rounds=4")))
    assert run_config == ("preset='demo-cpu' out-dir='runs/r1' "
                          "overrides='federation.min_sites=2 federation.rounds=4'")
    assert cfg.federation.rounds == 4 and cfg.output.dir == str(folder.root / "runs" / "r1")
    # a YAML file travels as its absolute path (the server app reads it on this machine)
    preset = tmp_path / "mine.yaml"
    preset.write_text("federation:\n  min_sites: 3\n")
    run_config, cfg = resolved_request(folder, _request(preset=str(preset), overrides=()))
    assert f"preset='{preset.resolve()}'" in run_config and cfg.federation.min_sites == 3


@pytest.mark.parametrize("change, fragment", [
    ({"name": "../elsewhere"}, "run name"),
    ({"overrides": ("federation.min_sites=2", "output.dir='x'")}, "cannot carry quotes"),
    ({"overrides": ()}, "federation.min_sites=N"),
    ({"overrides": ("federation.min_sites=2", "federation.roundz=3")}, "federation.roundz"),
    ({"resume": True}, "there is no run .* to resume"),
])
def test_a_run_request_the_server_app_would_refuse_is_refused_before_it_is_sent(
        tmp_path: Path, change: dict, fragment: str) -> None:
    from server.deployment import resolved_request

    folder = init_consortium(tmp_path / "c", "Test consortium", [])
    with pytest.raises(UserError, match=fragment):
        resolved_request(folder, _request(**change))


def test_a_run_folder_is_never_reused_unless_resumed(tmp_path: Path) -> None:
    from server.deployment import resolved_request
    from server.state import CHECKPOINT_FILE

    folder = init_consortium(tmp_path / "c", "Test consortium", [])
    run_dir = folder.root / "runs" / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text("[]")
    with pytest.raises(DeploymentError, match="already holds a run; continue it with --resume"):
        resolved_request(folder, _request())
    # stopped before its first checkpoint: --resume starts it over in its folder
    run_config, _ = resolved_request(folder, _request(resume=True))
    assert run_config.endswith("overrides='federation.min_sites=2'")
    (run_dir / CHECKPOINT_FILE).write_bytes(b"")
    run_config, _ = resolved_request(folder, _request(resume=True))
    assert run_config.endswith("overrides='federation.min_sites=2 output.resume=true'")
    (run_dir / "status.json").write_text('{"status": "released", "detail": ""}')
    with pytest.raises(DeploymentError, match="already released"):
        resolved_request(folder, _request(resume=True))


def test_pretrain_and_finetune_need_a_running_superlink(tmp_path: Path) -> None:
    folder = init_consortium(tmp_path / "c", "Test consortium", [])
    model = Path(__file__).resolve().parents[2] / "models" / "fedcmr-hybrid-sunnybrook"
    for args in (["pretrain", "demo-cpu", "federation.min_sites=2"],
                 ["finetune", "demo-cpu", "--model", str(model), "tasks.names=[sax_seg]",
                  "federation.finetune_rounds=1", "federation.min_sites=2"]):
        result = CliRunner().invoke(server_cli.app, [*args, "--name", "r1", "--dir", str(folder.root)])
        assert result.exit_code == 2 and "no SuperLink runs from" in result.output, result.output
