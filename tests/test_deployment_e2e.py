"""A consortium and two hospitals on loopback, as real OS processes of the stock Flower binaries:
``fedcmr-server init`` / ``start`` / ``admit``, ``fedcmr-client keygen`` / ``join``, then one
federation of the project's apps under sample-level DP submitted with ``fedcmr-server pretrain``
(``flwr run``), paused after its first round, one hospital's node restarted, and resumed: that
node's own accountant counts both rounds, its epsilon that of an uninterrupted run. Also: a
node whose key was not admitted is refused (with a key or without one), stale, future-dated
and foreign-key signatures are refused, a node trusting another CA cannot connect, plaintext
to the TLS port fails, a revoked node is refused, and a restarted SuperLink keeps its
admissions. Then three hospitals under SecAgg+: one killed (SIGKILL) once it has shared its
keys, the round ends with the survivors' sum; the server's process killed while it waits for
the next round; the hospital restarted and the run resumed with `fedcmr-server pretrain
--resume`, all three in round 2; the exported encoder loads in timm.

Marked ``e2e`` (``make e2e``); about 3 and 5 min on 2 CPU cores shared with other work.
"""

from __future__ import annotations

import datetime
import http.client
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest
import torch
from base64 import b64encode
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.common.constant import TIMESTAMP_HEADER
from flwr.proto.heartbeat_pb2 import SendNodeHeartbeatRequest  # pylint: disable=E0611
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER
from flwr.supercore.date import now
from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
from flwr.supercore.interceptors.http.utils import add_headers
from flwr.supercore.primitives.asymmetric import public_key_to_bytes, sign_message
from flwr.supernode.fleet_http_client import FleetHttpClient

from client.node_privacy import ACCOUNTANT_FILE, NodeAccountant
from server.deployment import ConsortiumDir, node_status, read_registry, running_link
from server.metrics import RecordKind, read_records
from server.run_status import RunStatus, read_outcome
from server.state import CHECKPOINT_FILE
from shared_model.privacy import epsilon_for
from shared_model.processes import stop_group
from sim.sites import site_spec, write_site_frames

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TOOLS = ("fedcmr-server", "fedcmr-client", "flower-superlink", "flower-supernode", "flwr")

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(400),
    pytest.mark.skipif(any(not (BIN / tool).exists() for tool in TOOLS),
                       reason="FedCMR's and Flower's command-line tools are not installed beside this Python"),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop_tree(process: subprocess.Popen[str]) -> None:
    """SIGTERM a ``join`` and everything below it (SuperNode, SuperExec, apps); SIGKILL stragglers."""
    try:
        family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for member in family:
        try:
            member.terminate()
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(family, timeout=20)
    _kill_all(alive)


def _kill_all(processes: list[psutil.Process]) -> None:
    """SIGKILL each process; one that has already exited (a child that went with its parent) is skipped."""
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            continue


@dataclass
class Loopback:
    """The commands a consortium and its hospitals type, run from a scratch folder."""

    root: Path
    env: dict[str, str]
    nodes: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def consortium(self) -> Path:
        return self.root / "consortium"

    def run(self, tool: str, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / tool), *args], env={**self.env, **env}, cwd=self.root,
                              capture_output=True, text=True, timeout=timeout)

    def start_consortium(self) -> tuple[ConsortiumDir, int]:
        """``fedcmr-server init`` and ``start`` on a free loopback port."""
        port = _free_port()
        folder = ConsortiumDir(self.consortium)
        assert self.run("fedcmr-server", "init", str(folder.root)).returncode == 0
        started = self.run("fedcmr-server", "start", str(folder.root), "--port", str(port), "--wait", "120",
                           timeout=180)
        assert started.returncode == 0, started.stdout + started.stderr
        return folder, port

    def hospital(self, name: str, index: int, admit: bool = True) -> None:
        """A hospital's key (``fedcmr-client keygen``) and store, admitted by the consortium."""
        assert self.run("fedcmr-client", "keygen", "--out", name).returncode == 0
        write_site_frames(self.root / name / "store", site_spec(index, 1.5, 128), num_images=16, seed=0)
        if admit:
            admitted = self.run("fedcmr-server", "admit", f"{name}/node-auth.key.pub", "--name", name,
                                "--dir", str(self.consortium))
            assert admitted.returncode == 0, admitted.stdout + admitted.stderr

    def join_args(self, name: str, port: int, ca: Path, site_index: int) -> list[str]:
        return ["join", "--server", f"127.0.0.1:{port}", "--ca", str(ca),
                "--key", str(self.root / name / "node-auth.key"),
                "--store", str(self.root / name / "store"), "--device", "cpu",
                "--site-index", str(site_index), "--runtime-port", str(_free_port())]

    def join(self, name: str, port: int, site_index: int) -> subprocess.Popen[str]:
        log = (self.root / f"{name}.log").open("w")
        process = subprocess.Popen(
            [str(BIN / "fedcmr-client"), *self.join_args(name, port, self.consortium / "pki" / "ca.crt", site_index)],
            env={**self.env, "FLWR_HOME": str(self.root / name / "flwr-home")}, cwd=self.root,
            stdout=log, stderr=subprocess.STDOUT, text=True)
        self.nodes.append(process)
        return process


@pytest.fixture
def loopback(tmp_path: Path) -> Iterator[Loopback]:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               FLWR_HOME=str(tmp_path / "flwr-home"), FLWR_TELEMETRY_ENABLED="0",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", OMP_WAIT_POLICY="PASSIVE",
               TIMM_FUSED_ATTN="0")
    world = Loopback(root=tmp_path, env=env)
    try:
        yield world
    finally:
        for process in world.nodes:
            _stop_tree(process)
        folder = ConsortiumDir(world.consortium)
        if (link := running_link(folder)) is not None:
            world.run("fedcmr-server", "stop", str(folder.root), timeout=60)
            stop_group(link.pid)  # in case stop itself failed


def _wait_online(folder: ConsortiumDir, node_ids: set[int], timeout_s: float) -> dict[int, str]:
    deadline = time.monotonic() + timeout_s
    status: dict[int, str] = {}
    while time.monotonic() < deadline:
        status = {int(n["node-id"]): n["status"] for n in node_status(folder)}
        if all(status.get(node) == "online" for node in node_ids):
            break
        time.sleep(2)
    return status


class _SignedAs:
    """Fleet authentication headers as a SuperNode sends them, with the claimed key, the key that
    signs and the signed time chosen by the test (an honest node uses its own key and now)."""

    def __init__(self, claimed: ec.EllipticCurvePrivateKey, signer: ec.EllipticCurvePrivateKey,
                 at: datetime.datetime) -> None:
        self.claimed, self.signer, self.timestamp = claimed, signer, at.isoformat()

    def intercept(self, context, call_next):  # type: ignore[no-untyped-def]
        add_headers(context.request, {
            FLEET_HTTP_PUBLIC_KEY_HEADER: b64encode(public_key_to_bytes(self.claimed.public_key())).decode(),
            TIMESTAMP_HEADER: self.timestamp,
            FLEET_HTTP_SIGNATURE_HEADER: b64encode(sign_message(self.signer, self.timestamp.encode())).decode()})
        return call_next(context)


def _heartbeat(port: int, ca: Path, node_id: int, signed: _SignedAs) -> int:
    """The HTTP status the SuperLink answers one heartbeat for ``node_id`` with."""
    with FleetHttpClient.from_server_address(
            f"127.0.0.1:{port}", False, str(ca),
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperNode"), signed]) as client:
        try:
            client.SendNodeHeartbeat(SendNodeHeartbeatRequest(node=Node(node_id=node_id), heartbeat_interval=30))
        except httpx.HTTPStatusError as exc:
            return exc.response.status_code
    return 200


def _node_key(folder: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_ssh_private_key((folder / "node-auth.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


@pytest.mark.reliability(1, 2, 3, 10)
def test_two_hospitals_join_a_tls_consortium_and_run_a_round(loopback: Loopback) -> None:
    # Prepare: the consortium's folder and SuperLink; three hospitals' keys and stores
    folder, port = loopback.start_consortium()
    again = loopback.run("fedcmr-server", "start", str(folder.root), "--port", str(port))
    assert again.returncode == 2 and "already runs" in again.stderr, again.stdout + again.stderr
    for index, name in enumerate(("hospital-a", "hospital-b", "intruder")):
        loopback.hospital(name, index, admit=name != "intruder")

    # Execute: both admitted hospitals join
    for index, name in enumerate(("hospital-a", "hospital-b")):
        loopback.join(name, port, index)
    node_ids = {int(entry["node_id"]) for entry in read_registry(folder).values()}
    status = _wait_online(folder, node_ids, timeout_s=90)

    # Assert: both online over TLS with their own keys
    assert all(status.get(node) == "online" for node in node_ids), status

    # Execute / Assert: signed Fleet requests with hospital-a's key: an honest one is answered;
    # a stale or future-dated signature, hospital-a's key signed by another key, and hospital-a
    # asking as hospital-b are refused (check 2)
    registry = read_registry(folder)
    a_id, b_id = (int(registry[name]["node_id"]) for name in ("hospital-a", "hospital-b"))
    a_key, foreign = _node_key(loopback.root / "hospital-a"), _node_key(loopback.root / "intruder")
    minutes = datetime.timedelta(minutes=10)
    answers = {case: _heartbeat(port, folder.tls.ca_cert, node, _SignedAs(a_key, signer, now() + shift))
               for case, node, signer, shift in (
                   ("honest", a_id, a_key, datetime.timedelta()), ("stale", a_id, a_key, -minutes),
                   ("future-dated", a_id, a_key, minutes), ("foreign key", a_id, foreign, datetime.timedelta()),
                   ("another node's id", b_id, a_key, datetime.timedelta()))}
    assert answers == {"honest": 200, "stale": 401, "future-dated": 401, "foreign key": 401,
                       "another node's id": 401}, answers

    # Execute / Assert: a key the consortium never admitted is refused, with a clear line
    intruder = loopback.run("fedcmr-client", *loopback.join_args("intruder", port, folder.tls.ca_cert, 2),
                            "--max-wait", "30", FLWR_HOME=str(loopback.root / "intruder" / "flwr-home"))
    assert intruder.returncode == 2, intruder.stdout + intruder.stderr
    assert "refused this node's key" in intruder.stderr and "Traceback" not in intruder.stderr
    assert len(node_status(folder)) == 2

    # Execute / Assert: a stock SuperNode without any key cannot register itself either
    keyless_log = loopback.root / "keyless.log"
    with keyless_log.open("w") as log:  # a file, not a pipe: the SuperExec it starts outlives it
        keyless = subprocess.Popen(
            [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{port}", "--root-certificates",
             str(folder.tls.ca_cert), "--port", str(_free_port()), "--max-wait-time", "30"],
            env={**loopback.env, "FLWR_HOME": str(loopback.root / "keyless")}, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        keyless_status = keyless.wait(timeout=120)
    finally:
        stop_group(keyless.pid)
    assert keyless_status != 0 and "must be registered" in keyless_log.read_text()
    assert len(node_status(folder)) == 2

    # Execute / Assert: an admitted node that trusts another CA does not connect
    assert loopback.run("fedcmr-server", "init", "other-consortium").returncode == 0
    wrong_ca = loopback.run("fedcmr-client", *loopback.join_args(
        "hospital-a", port, loopback.root / "other-consortium" / "pki" / "ca.crt", 0), "--max-wait", "30")
    assert wrong_ca.returncode == 2 and "does not vouch for" in wrong_ca.stderr, wrong_ca.stdout + wrong_ca.stderr

    # Execute / Assert: plaintext HTTP to the TLS port gets no answer
    with pytest.raises((urllib.error.URLError, http.client.HTTPException, ConnectionError)):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10)

    # Execute: two rounds of the project's apps under sample-level DP, submitted to this
    # SuperLink with `fedcmr-server pretrain` (flwr run), paused after the first as for a
    # maintenance window
    out = folder.root / "runs" / "round-1"
    overrides = ["ssl.local_steps=1", "ssl.batch_size=8", "federation.min_sites=2", "federation.rounds=2",
                 "federation.finetune_rounds=0", "privacy.mode=sample", "ssl.mae.decoder=dense", "device=cpu"]
    submitted = loopback.run("fedcmr-server", "pretrain", "demo-cpu", *overrides, "output.stop_after_round=1",
                             "--name", "round-1", "--dir", str(folder.root), timeout=300)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    paused = read_outcome(out)
    assert paused is not None and paused.status == RunStatus.paused, paused
    again = loopback.run("fedcmr-server", "pretrain", "demo-cpu", *overrides, "--name", "round-1",
                         "--dir", str(folder.root))
    assert again.returncode == 2 and "--resume" in again.stderr, again.stdout + again.stderr
    # ... hospital-a's node restarted in the window (its SuperNode a new process) ...
    accountant = loopback.root / "hospital-a" / "store" / "node-state" / ACCOUNTANT_FILE
    after_round_1 = NodeAccountant(accountant).history()
    first_a = loopback.nodes[0]
    first_a.terminate()
    assert first_a.wait(timeout=60) is not None
    loopback.join("hospital-a", port, 0)
    assert all(s == "online" for s in _wait_online(folder, node_ids, timeout_s=90).values())
    # ... then resumed from its checkpoint
    resumed = loopback.run("fedcmr-server", "pretrain", "demo-cpu", *overrides, "--name", "round-1", "--resume",
                           "--dir", str(folder.root), timeout=300)

    # Assert: the run released a model trained at both hospitals in both rounds, in the
    # consortium's runs/
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    outcome = read_outcome(out)
    assert outcome is not None and outcome.status == RunStatus.released
    fits = [r for r in read_records(out) if r["kind"] == RecordKind.fit]
    assert [r["round"] for r in fits] == [1, 2] and all(set(r["sites"]) == {"site-0", "site-1"} for r in fits)
    assert (out / "release" / "encoder.safetensors").is_file()

    # Assert (check 10): the restarted node's own accountant counts both rounds, and its epsilon
    # is that of the same two DP rounds run without a restart (one step each, noise 1.0)
    assert len(after_round_1) == 1 and after_round_1[0][0] == 1.0 and after_round_1[0][2] == 1, after_round_1
    rate = after_round_1[0][1]
    rows = NodeAccountant(accountant).history()
    assert sum(int(row[2]) for row in rows) == 2 and {(n, q) for n, q, _ in rows} == {(1.0, rate)}, rows
    uninterrupted = epsilon_for([[1.0, rate, 2]], 1e-5, "prv")
    assert NodeAccountant(accountant).epsilon(1e-5) == pytest.approx(uninterrupted, rel=1e-6)
    assert uninterrupted > epsilon_for(after_round_1, 1e-5, "prv")

    # Execute / Assert: once revoked, a hospital's key is refused like any other
    revoked = loopback.run("fedcmr-server", "revoke", "hospital-b", "--dir", str(folder.root))
    assert revoked.returncode == 0, revoked.stdout + revoked.stderr
    rejoin = loopback.run("fedcmr-client", *loopback.join_args("hospital-b", port, folder.tls.ca_cert, 1),
                          "--max-wait", "30", FLWR_HOME=str(loopback.root / "hospital-b" / "flwr-home-2"))
    assert rejoin.returncode == 2 and "refused this node's key" in rejoin.stderr, rejoin.stdout + rejoin.stderr

    # Execute / Assert: the SuperLink restarted from its state database still knows who is admitted
    assert loopback.run("fedcmr-server", "stop", str(folder.root), timeout=60).returncode == 0
    restarted = loopback.run("fedcmr-server", "start", str(folder.root), "--port", str(port), "--wait", "120",
                             timeout=180)
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    known = {int(n["node-id"]): n["status"] for n in node_status(folder)}
    registry = read_registry(folder)
    assert known[int(registry["hospital-a"]["node_id"])] in ("online", "offline", "registered"), known
    assert known[int(registry["hospital-b"]["node_id"])] == "unregistered", known

    # Execute / Assert: SIGTERM to `fedcmr-client join` stops its SuperNode and what that started
    hospital_a = loopback.nodes[-1]  # the restarted hospital-a
    below = psutil.Process(hospital_a.pid).children(recursive=True)
    assert any("flower-supernode" in " ".join(p.cmdline()) for p in below)
    hospital_a.terminate()
    assert hospital_a.wait(timeout=60) is not None
    _, alive = psutil.wait_procs(below, timeout=30)
    assert alive == []


def _audit_lines(store: Path) -> list[dict]:
    """The node's audit log so far (a line being written is left for the next look)."""
    path = store / "node-state" / "node-audit.jsonl"
    lines = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return lines


def _serverapp_processes(folder: ConsortiumDir) -> list[psutil.Process]:
    link = running_link(folder)
    assert link is not None
    return [p for p in psutil.Process(link.pid).children(recursive=True)
            if any("serverapp" in part for part in p.cmdline())]


@pytest.mark.timeout(600)
@pytest.mark.reliability(8, 11, 12)
def test_three_hospitals_under_secagg_survive_a_killed_node_and_a_killed_server(loopback: Loopback) -> None:
    # Prepare: a consortium with three admitted hospitals online
    folder, port = loopback.start_consortium()
    names = ("hospital-a", "hospital-b", "hospital-c")
    for index, name in enumerate(names):
        loopback.hospital(name, index)
    joined = {name: loopback.join(name, port, index) for index, name in enumerate(names)}
    node_ids = {int(entry["node_id"]) for entry in read_registry(folder).values()}
    assert all(s == "online" for s in _wait_online(folder, node_ids, timeout_s=120).values())

    # Execute: two SecAgg+ rounds (3 sites, 3 shares, threshold 2), submitted in the background
    out = folder.root / "runs" / "secure"
    overrides = ["ssl.local_steps=1", "ssl.batch_size=8", "federation.min_sites=3", "federation.rounds=2",
                 "federation.finetune_rounds=0", "federation.site_wait_s=300", "federation.secagg.timeout_s=60",
                 "federation.round_timeout_s=60", "device=cpu"]
    with (loopback.root / "pretrain.log").open("w") as log:
        submitted = subprocess.Popen([str(BIN / "fedcmr-server"), "pretrain", "demo-cpu", *overrides,
                                      "--name", "secure", "--dir", str(folder.root)],
                                     env=loopback.env, cwd=loopback.root, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
    try:
        # ... hospital-c is killed (SIGKILL, its SuperNode and app with it) once it has answered
        # the round's key set-up and share-keys stages, before it sends its masked update
        c_store = loopback.root / "hospital-c" / "store"
        deadline = time.monotonic() + 180
        while len([r for r in _audit_lines(c_store) if r["message_type"] == "train"]) < 2:
            assert time.monotonic() < deadline and submitted.poll() is None, \
                (loopback.root / "pretrain.log").read_text()[-3000:]
            time.sleep(0.05)
        victims = [psutil.Process(joined["hospital-c"].pid),
                   *psutil.Process(joined["hospital-c"].pid).children(recursive=True)]
        _kill_all(victims)
        psutil.wait_procs(victims, timeout=30)
        # ... the round completes with the two survivors and is checkpointed; round 2 waits for
        # three sites
        deadline = time.monotonic() + 180
        while not ((out / CHECKPOINT_FILE).is_file()
                   and [r for r in read_records(out) if r["kind"] == RecordKind.fit and r["round"] == 1]):
            assert time.monotonic() < deadline, (loopback.root / "pretrain.log").read_text()[-3000:]
            time.sleep(1)
        # ... then the server's process is killed while it waits
        apps = _serverapp_processes(folder)
        assert apps, "no ServerApp process under the SuperLink"
        _kill_all(apps)
        psutil.wait_procs(apps, timeout=30)
    finally:
        stop_group(submitted.pid)  # the submitting CLI and its `flwr run --stream`
    sent_by_c = [r for r in _audit_lines(c_store) if r["message_type"] == "train"]

    # Execute: hospital-c restarts and the consortium resumes the run from its checkpoint
    loopback.join("hospital-c", port, 2)
    assert all(s == "online" for s in _wait_online(folder, node_ids, timeout_s=120).values())
    resumed = loopback.run("fedcmr-server", "pretrain", "demo-cpu", *overrides, "--name", "secure", "--resume",
                           "--dir", str(folder.root), timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    # Assert: round 1 aggregated the survivors only (hospital-c never sent a masked update),
    # round 2 all three, and the release's encoder loads in timm
    outcome = read_outcome(out)
    assert outcome is not None and outcome.status == RunStatus.released, outcome
    fits = {r["round"]: set(r["sites"]) for r in read_records(out) if r["kind"] == RecordKind.fit}
    assert fits == {1: {"site-0", "site-1"}, 2: {"site-0", "site-1", "site-2"}}, fits
    assert len(sent_by_c) == 2 and all(not r["arrays"] or r["bytes"] < 10_000 for r in sent_by_c)
    exported = loopback.run("fedcmr-server", "export", str(out), "--out", str(loopback.root / "bundle"))
    assert exported.returncode == 0, exported.stdout + exported.stderr
    import timm

    import shared_model.encoders  # noqa: F401 - registers the presets with timm
    from shared_model.bundle import load_bundle
    from shared_model.presets import PRESETS

    preset = PRESETS[load_bundle(loopback.root / "bundle").config.model.preset]
    encoder = timm.create_model(preset.timm_name, in_chans=1, num_classes=0,
                                checkpoint_path=str(loopback.root / "bundle" / "encoder.safetensors"))
    assert encoder(torch.zeros(1, 1, preset.image_size, preset.image_size)).isfinite().all()
