"""The hospital's side of a deployment: its SuperNode key and the stock ``flower-supernode``.

``keygen`` makes the node's identity: an EC P-384 key pair in OpenSSH format, the private half
for ``flower-supernode --auth-supernode-private-key`` (mode 0600, never replaced), the public
half (``.pub``) for the consortium's ``fedcmr-server admit``. ``join`` checks everything a
SuperNode needs before it starts one — the CA certificate, the key, the store — so that a wrong
file is one clear line here rather than a retry loop there, then runs ``flower-supernode`` in
the foreground with TLS, that key, and the store in its ``node_config`` (read by
:func:`client.node_settings.node_settings_from_context`).
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TextIO

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from client.node_settings import NodePolicy
from client.store import LocalStore
from shared_model.errors import UserError
from shared_model.files import write_public, write_secret
from shared_model.processes import certificate_problem, flower_binary, flower_environment, stop_group

KEY_NAME = "node-auth.key"
DEFAULT_RUNTIME_PORT = 9094  # flower-supernode's own Runtime API, on 127.0.0.1
DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?(,cuda:\d+)*)$")
ADDRESS = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")


class NodeDeploymentError(UserError, RuntimeError):
    """A file or setting this node's SuperNode cannot start with."""


@dataclass(frozen=True)
class NodeKeyPair:
    private: Path
    public: Path
    public_line: str


def generate_node_key(out: Path) -> NodeKeyPair:
    """A new SuperNode key pair in ``out`` (``node-auth.key`` 0600 and ``node-auth.key.pub``)."""
    private, public = out / KEY_NAME, out / f"{KEY_NAME}.pub"
    for path in (private, public):
        if path.exists():
            raise NodeDeploymentError(f"{path} already exists; refusing to replace this node's "
                                      "identity (the consortium admitted its public key)")
    key = ec.generate_private_key(ec.SECP384R1())
    write_secret(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                            serialization.NoEncryption()))
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH).decode()
    write_public(public, f"{line} fedcmr-node\n".encode())
    return NodeKeyPair(private=private, public=public, public_line=line)


def check_node_key(path: Path) -> None:
    """The file must be an unencrypted OpenSSH EC private key (what ``keygen`` writes)."""
    if not path.is_file():
        raise NodeDeploymentError(f"node key {path} does not exist; make one with "
                                  "`fedcmr-client keygen --out DIR`")
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise NodeDeploymentError(f"{path} is not an unencrypted OpenSSH private key; pass the "
                                  f"{KEY_NAME} that `fedcmr-client keygen` wrote (not the .pub)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise NodeDeploymentError(f"{path} is not an EC key; Flower authenticates SuperNodes with "
                                  "EC keys; make one with `fedcmr-client keygen`")


def check_ca_certificate(path: Path) -> None:
    if not path.is_file():
        raise NodeDeploymentError(f"CA certificate {path} does not exist; the consortium sends "
                                  "its pki/ca.crt")
    try:
        x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError:
        raise NodeDeploymentError(f"{path} is not a PEM certificate; pass the consortium's ca.crt") from None


@dataclass(frozen=True)
class JoinSettings:
    """What ``fedcmr-client join`` starts a SuperNode with."""

    server: str  # HOST:PORT of the consortium's SuperLink
    ca_cert: Path
    key: Path
    store: Path
    device: str = "auto"
    site_index: int = 0  # this site's number in the consortium (names it in the server's records)
    runtime_port: int = DEFAULT_RUNTIME_PORT
    max_wait_s: float | None = None  # give up reconnecting after this long (None: never)
    policy: NodePolicy = NodePolicy()  # what this node accepts from the server


def node_config(settings: JoinSettings) -> str:
    """``--node-config`` for the ClientApp: the store's absolute path, the device, the site
    index and the node's policy."""
    store = str(settings.store.resolve())
    if "'" in store:
        raise NodeDeploymentError(f"the store path {store} contains a quote; move the store")
    policy = settings.policy
    return (f"store='{store}' device='{settings.device}' site-index={settings.site_index} "
            f"min-secagg-threshold={policy.min_secagg_threshold} "
            f"min-secagg-shares={policy.min_secagg_shares} "
            f"require-secagg='{str(policy.require_secagg).lower()}' "
            f"min-noise-multiplier={float(policy.min_noise_multiplier)} "
            f"max-epsilon={float(policy.max_epsilon)} privacy-delta={float(policy.delta)} "
            f"max-message-mb={float(policy.max_message_mb)}")


def supernode_command(settings: JoinSettings) -> list[str]:
    """The stock ``flower-supernode`` with TLS, SuperNode authentication and this node's store,
    after checking every file and setting it needs."""
    if not ADDRESS.match(settings.server) or not 0 < int(settings.server.rsplit(":", 1)[1]) < 65536:
        raise NodeDeploymentError(f"--server '{settings.server}' must be HOST:PORT, e.g. fedcmr.example.org:9092")
    if not DEVICE.match(settings.device):
        raise NodeDeploymentError(f"--device '{settings.device}' must be auto, cpu, cuda, cuda:N "
                                  "or a list such as cuda:0,cuda:1")
    check_ca_certificate(settings.ca_cert)
    check_node_key(settings.key)
    LocalStore.open(settings.store)  # a StoreError names what is wrong with it
    command = [str(flower_binary("flower-supernode")),
               "--superlink", settings.server,
               "--root-certificates", str(settings.ca_cert.resolve()),
               "--auth-supernode-private-key", str(settings.key.resolve()),
               "--node-config", node_config(settings),
               "--port", str(settings.runtime_port)]
    if settings.max_wait_s is not None:
        command += ["--max-wait-time", f"{settings.max_wait_s:g}"]
    return command


# What the SuperNode's log says when the SuperLink turns it away, and what to tell the user.
REFUSALS = (
    ("Failed to activate SuperNode",
     "the SuperLink at {server} refused this node's key {key}: it was not admitted, or was "
     "revoked; send {key}.pub to the consortium (fedcmr-server admit)"),
    ("CERTIFICATE_VERIFY_FAILED",
     "the server at {server} has a certificate that {ca} does not vouch for; check that --ca is "
     "the consortium's ca.crt and --server its address"),
)


def run_supernode(settings: JoinSettings, output: TextIO | None = None) -> int:
    """Run the SuperNode in the foreground until it exits, its log passed through to ``output``
    (stdout); SIGINT/SIGTERM reach it. Its exit status, or an error when the SuperLink refused it."""
    command = supernode_command(settings)
    host, port = settings.server.rsplit(":", 1)
    problem = certificate_problem(host.strip("[]"), int(port), settings.ca_cert)
    if problem is not None:  # no SuperNode starts, so nothing of the node is sent there
        raise NodeDeploymentError(f"the server at {settings.server} {problem}; check that --ca is the "
                                  "consortium's ca.crt and --server its address")
    process = subprocess.Popen(command, env=flower_environment(Path(command[0])), start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    refusals: list[str] = []
    # A thread copies the log: the SuperNode's children hold the pipe open after it exits, so the
    # end of its output is not the end of the SuperNode.
    copier = threading.Thread(target=_copy_log, args=(process, output or sys.stdout, refusals), daemon=True)
    copier.start()

    def forward(signum: int, _frame: FrameType | None) -> None:
        process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop_group(process.pid)  # whatever the SuperNode started and left behind (app processes)
        copier.join(timeout=5.0)
    if status != 0 and refusals:
        raise NodeDeploymentError(refusals[0].format(server=settings.server, key=settings.key, ca=settings.ca_cert))
    return status


def _copy_log(process: subprocess.Popen[str], sink: TextIO, refusals: list[str]) -> None:
    for line in process.stdout or ():
        sink.write(line)
        sink.flush()
        refusals.extend(why for marker, why in REFUSALS if marker in line)
