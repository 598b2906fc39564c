"""``fedcmr-client keygen`` and ``join`` without a SuperLink: the key Flower accepts, the SuperNode
command line, and the refusals that come before a SuperNode starts."""

from __future__ import annotations

import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.cli.supernode.register import try_load_public_key
from flwr.common.config import parse_config_args
from typer.testing import CliRunner

from client.cli import app
from client.deployment import (
    JoinSettings,
    NodeDeploymentError,
    generate_node_key,
    supernode_command,
)
from client.node_settings import node_settings_from_context
from client.store import LocalStore, StoreError
from shared_model.errors import UserError


def _ca(tmp_path: Path) -> Path:
    from server.pki import CertificatePaths, write_tls  # the consortium's CA, as a hospital receives it

    paths = CertificatePaths(*(tmp_path / "pki" / n for n in ("ca.crt", "ca.key", "s.crt", "s.key")))
    write_tls(paths, "Test", ["127.0.0.1"])
    return paths.ca_cert


@pytest.fixture
def node(tmp_path: Path) -> JoinSettings:
    store = tmp_path / "store"
    LocalStore.create(store, spacing_mm=1.5, crop_px=32)
    pair = generate_node_key(tmp_path / "key")
    return JoinSettings(server="127.0.0.1:9092", ca_cert=_ca(tmp_path), key=pair.private, store=store,
                        device="cuda:1", site_index=3, runtime_port=19094)


def test_keygen_writes_a_key_pair_flower_accepts(tmp_path: Path) -> None:
    # Execute
    result = CliRunner().invoke(app, ["keygen", "--out", str(tmp_path / "key")])
    # Assert: private 0600 and an EC key as flower-supernode loads it; the printed public key is
    # the .pub that `flwr supernode register` loads
    assert result.exit_code == 0, result.output
    private, public = tmp_path / "key" / "node-auth.key", tmp_path / "key" / "node-auth.key.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = serialization.load_ssh_private_key(private.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    line = public.read_text().split()
    assert " ".join(line[:2]) in result.output.replace("\n", "")
    assert try_load_public_key(public) == key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_keygen_never_replaces_a_node_identity(tmp_path: Path) -> None:
    # Prepare
    first = generate_node_key(tmp_path)
    before = first.private.read_bytes()
    # Execute
    result = CliRunner().invoke(app, ["keygen", "--out", str(tmp_path)])
    # Assert
    assert result.exit_code == 2 and "refusing to replace" in result.output
    assert first.private.read_bytes() == before


def test_the_supernode_runs_with_tls_its_key_and_the_store_in_node_config(node: JoinSettings) -> None:
    # Execute
    command = supernode_command(node)
    # Assert: TLS with the consortium CA (no --insecure), SuperNode authentication, and a
    # node_config the ClientApp reads its store and device from
    flags = dict(zip(command[1::2], command[2::2]))
    assert Path(command[0]).name == "flower-supernode" and "--insecure" not in command
    assert flags["--superlink"] == "127.0.0.1:9092"
    assert flags["--root-certificates"] == str(node.ca_cert.resolve())
    assert flags["--auth-supernode-private-key"] == str(node.key.resolve())
    assert flags["--port"] == "19094"
    context = SimpleNamespace(node_config=parse_config_args([flags["--node-config"]]), run_config={})
    settings = node_settings_from_context(context)  # type: ignore[arg-type]
    assert (settings.store, settings.device, settings.site_index) == (node.store.resolve(), "cuda:1", 3)

    # the node's policy travels the same way
    from client.node_settings import NodePolicy

    strict = NodePolicy(min_secagg_threshold=3, min_secagg_shares=4, require_secagg=True,
                        min_noise_multiplier=1.5, max_epsilon=8.0, delta=1e-6, max_message_mb=64.0)
    strict_command = supernode_command(JoinSettings(**{**node.__dict__, "policy": strict}))
    strict_flags = dict(zip(strict_command[1::2], strict_command[2::2]))
    context = SimpleNamespace(node_config=parse_config_args([strict_flags["--node-config"]]), run_config={})
    assert node_settings_from_context(context).policy == strict  # type: ignore[arg-type]
    assert settings.policy == NodePolicy()


@pytest.mark.parametrize("change, error, fragment", [
    ({"server": "127.0.0.1"}, NodeDeploymentError, "HOST:PORT"),
    ({"server": "https://x:9092"}, NodeDeploymentError, "HOST:PORT"),
    ({"device": "gpu0"}, NodeDeploymentError, "--device"),
    ({"ca_cert": Path("/nonexistent/ca.crt")}, NodeDeploymentError, "does not exist"),
    ({"key": Path("/nonexistent/node-auth.key")}, NodeDeploymentError, "keygen"),
    ({"store": Path("/nonexistent/store")}, StoreError, "fedcmr-client ingest"),
])
def test_a_wrong_setting_is_refused_before_a_supernode_starts(node: JoinSettings, change, error, fragment) -> None:
    settings = JoinSettings(**{**node.__dict__, **change})
    with pytest.raises(error, match=fragment):
        supernode_command(settings)


def test_the_public_key_or_a_certificate_is_not_a_node_key(node: JoinSettings) -> None:
    for wrong in (Path(f"{node.key}.pub"), node.ca_cert):
        with pytest.raises(NodeDeploymentError, match="not an unencrypted OpenSSH private key"):
            supernode_command(JoinSettings(**{**node.__dict__, "key": wrong}))
    with pytest.raises(NodeDeploymentError, match="not a PEM certificate"):
        supernode_command(JoinSettings(**{**node.__dict__, "ca_cert": node.key}))


def test_join_prints_one_line_errors(node: JoinSettings) -> None:
    # Execute
    result = CliRunner().invoke(app, ["join", "--server", node.server, "--ca", str(node.ca_cert),
                                      "--key", f"{node.key}.pub", "--store", str(node.store)])
    # Assert
    assert result.exit_code == 2 and "not an unencrypted OpenSSH private key" in result.output
    assert "Traceback" not in result.output
    assert issubclass(NodeDeploymentError, UserError)
