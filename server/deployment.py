"""The consortium's deployment folder and the stock Flower SuperLink that serves it.

``fedcmr-server init DIR`` lays out::

    DIR/consortium.json          name, the addresses the certificate names, when it was made
    DIR/pki/ca.crt, ca.key       the consortium CA (ca.crt goes to every hospital)
    DIR/pki/superlink.crt, .key  the SuperLink's TLS certificate and key
    DIR/signing/                 the app-signing key and trusted-entities.yaml for hospitals
    DIR/state/                   superlink.db (Flower's state), superlink.json (where it runs)
    DIR/runs/, DIR/releases/     federations and their release bundles
    DIR/logs/                    superlink.log (Flower's own, rotated) and its console output
    DIR/flwr-home/               the ``flwr`` CLI's connection to this SuperLink (FLWR_HOME)
    DIR/nodes.json               admitted hospitals: site name -> public key, Flower node id

``start`` runs ``flower-superlink`` with TLS, SuperNode authentication and the state database
on; ``admit`` / ``revoke`` register and unregister a hospital's key with Flower's own
``flwr supernode register`` / ``unregister``; ``pretrain`` / ``finetune`` submit FedCMR's apps
to that SuperLink with ``flwr run --stream`` into ``DIR/runs/NAME`` (:func:`submit_run`). Every
key private to the consortium is mode 0600.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import psutil
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from server.pki import DEFAULT_ADDRESSES, CertificatePaths, certificate_addresses, write_signing_key, write_tls
from shared_model.config import FedCMRConfig, load_config
from shared_model.errors import UserError
from shared_model.files import atomic_write_text
from shared_model.processes import (
    LaunchError,
    check_port_free,
    flower_binary,
    flower_environment,
    start_detached,
    stop_group,
    tls_answers,
    wait_until,
)

CONNECTION = "fedcmr"  # the flwr CLI's name for this consortium's SuperLink
DEFAULT_PORT = 9092
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
FLWR_CLI_TIMEOUT_S = 120.0


class DeploymentError(UserError, RuntimeError):
    """The deployment folder, a node key or the SuperLink is not as a command needs it."""


@dataclass(frozen=True)
class ConsortiumDir:
    """The paths of one consortium's deployment folder (see the module docstring)."""

    root: Path

    @property
    def tls(self) -> CertificatePaths:
        pki = self.root / "pki"
        return CertificatePaths(ca_cert=pki / "ca.crt", ca_key=pki / "ca.key",
                                server_cert=pki / "superlink.crt", server_key=pki / "superlink.key")

    @property
    def signing(self) -> Path:
        return self.root / "signing"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def database(self) -> Path:
        return self.state / "superlink.db"

    @property
    def link_file(self) -> Path:
        return self.state / "superlink.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr-home"

    @property
    def nodes_file(self) -> Path:
        return self.root / "nodes.json"

    @property
    def info_file(self) -> Path:
        return self.root / "consortium.json"

    def private_keys(self) -> list[Path]:
        return [self.tls.ca_key, self.tls.server_key, self.signing / "consortium-app.key"]

    def require_initialised(self) -> None:
        if not self.info_file.is_file():
            raise DeploymentError(f"{self.root} is not a consortium folder (no consortium.json); "
                                  f"create it with `fedcmr-server init {self.root}`")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def init_consortium(root: Path, name: str, addresses: Sequence[str]) -> ConsortiumDir:
    """Create the CA, the SuperLink certificate for ``addresses`` (plus 127.0.0.1 and localhost),
    the app-signing key and the folder layout. Refuses a folder that already holds keys."""
    folder = ConsortiumDir(root)
    existing = [p for p in [*folder.private_keys(), folder.info_file] if p.exists()]
    if existing:
        raise DeploymentError(f"{root} already holds a consortium ({existing[0]} exists); "
                              "refusing to overwrite its keys; choose a new folder")
    all_addresses = list(dict.fromkeys([*DEFAULT_ADDRESSES, *addresses]))
    for sub in ("pki", "signing", "state", "runs", "releases", "logs", "flwr-home"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for private in ("pki", "signing", "state", "flwr-home"):
        os.chmod(root / private, 0o700)
    write_tls(folder.tls, name, all_addresses)
    key_id = write_signing_key(folder.signing / "consortium-app.key", folder.signing / "consortium-app.pub",
                               folder.signing / "trusted-entities.yaml")
    atomic_write_text(folder.nodes_file, "{}\n")
    atomic_write_text(folder.info_file, json.dumps(
        {"name": name, "addresses": all_addresses, "signing_key_id": key_id, "created": _now()},
        indent=2) + "\n")
    return folder


@dataclass(frozen=True)
class RunningLink:
    """Where this consortium's SuperLink runs (``state/superlink.json``)."""

    pid: int
    host: str
    port: int

    @property
    def local_address(self) -> str:
        """The address the consortium's own tools dial (loopback when it listens everywhere)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


def running_link(folder: ConsortiumDir) -> RunningLink | None:
    """The SuperLink started from this folder, if it is still running."""
    if not folder.link_file.is_file():
        return None
    data = json.loads(folder.link_file.read_text(encoding="utf-8"))
    link = RunningLink(pid=int(data["pid"]), host=str(data["host"]), port=int(data["port"]))
    return link if _is_superlink(link.pid) else None


def _is_superlink(pid: int) -> bool:
    """Whether ``pid`` is still a flower-superlink (after a reboot the number may be reused)."""
    try:
        return any("flower-superlink" in part for part in psutil.Process(pid).cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def superlink_command(folder: ConsortiumDir, host: str, port: int) -> list[str]:
    """The stock ``flower-superlink`` with TLS, SuperNode authentication and a state database."""
    tls = folder.tls
    return [str(flower_binary("flower-superlink")),
            "--ssl-ca-certfile", str(tls.ca_cert.resolve()), "--ssl-certfile", str(tls.server_cert.resolve()),
            "--ssl-keyfile", str(tls.server_key.resolve()),
            "--enable-supernode-auth",
            "--database", str(folder.database.resolve()),
            "--host", host, "--port", str(port),
            "--log-file", str((folder.logs / "superlink.log").resolve()),
            "--disable-runtime-dependency-installation"]


def start_superlink(folder: ConsortiumDir, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                    wait_s: float = 90.0) -> RunningLink:
    """Start the SuperLink in the background and wait (at most ``wait_s``) until it serves TLS."""
    folder.require_initialised()
    if (link := running_link(folder)) is not None:
        raise DeploymentError(f"a SuperLink from {folder.root} already runs (process {link.pid}, "
                              f"port {link.port}); stop it with `fedcmr-server stop {folder.root}`")
    connect_host = RunningLink(0, host, port).local_address.rsplit(":", 1)[0].strip("[]")
    names = certificate_addresses(folder.tls.server_cert)
    if connect_host not in names:
        raise DeploymentError(f"the SuperLink certificate does not name {connect_host} (it names "
                              f"{', '.join(names)}); listen on one of those with --host")
    check_port_free(host, port)
    command = superlink_command(folder, host, port)
    console_log = folder.logs / "superlink.console.log"
    # FLWR_HOME inside the folder: the apps the SuperLink installs to run stay with its state;
    # the folder as working directory: a run's relative out-dir lands in it (runs/...).
    env = flower_environment(Path(command[0]), {"FLWR_HOME": str(folder.flwr_home.resolve())})
    process = start_detached(command, console_log, env, cwd=folder.root)
    link = RunningLink(pid=process.pid, host=host, port=port)
    atomic_write_text(folder.link_file, json.dumps({"pid": link.pid, "host": host, "port": port,
                                                    "started": _now()}) + "\n")
    write_flwr_connection(folder, link)
    try:
        wait_until(lambda: tls_answers(connect_host, port, folder.tls.ca_cert, connect_host),
                   process, wait_s, "flower-superlink", console_log)
    except LaunchError:
        if process.poll() is not None:
            folder.link_file.unlink(missing_ok=True)
        raise
    return link


def stop_superlink(folder: ConsortiumDir) -> bool:
    """Stop the SuperLink started from this folder; False if none was running."""
    link = running_link(folder)
    folder.link_file.unlink(missing_ok=True)
    return link is not None and stop_group(link.pid)


def write_flwr_connection(folder: ConsortiumDir, link: RunningLink) -> None:
    """The ``flwr`` CLI's connection to this SuperLink, verified with the consortium CA."""
    atomic_write_text(folder.flwr_home / "config.toml", (
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{link.local_address}"\n'
        f'root-certificates = "{folder.tls.ca_cert.resolve()}"\n'))


def flwr_cli(folder: ConsortiumDir, args: Sequence[str]) -> Any:
    """Run ``flwr ARGS --format json`` against this consortium's SuperLink; its JSON answer."""
    if running_link(folder) is None:
        raise DeploymentError(f"no SuperLink runs from {folder.root}; start it with "
                              f"`fedcmr-server start {folder.root}`")
    flwr = flower_binary("flwr")
    env = flower_environment(flwr, {"FLWR_HOME": str(folder.flwr_home.resolve())})
    try:
        proc = subprocess.run([str(flwr), *args, CONNECTION, "--format", "json"], env=env,
                              capture_output=True, text=True, timeout=FLWR_CLI_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise DeploymentError(f"`flwr {' '.join(args)}` got no answer within "
                              f"{FLWR_CLI_TIMEOUT_S:.0f} s") from None
    answer = _last_json(proc.stdout)
    if proc.returncode != 0 or not isinstance(answer, dict) or not answer.get("success", False):
        reason = (answer or {}).get("error-message") if isinstance(answer, dict) else None
        detail = reason or (proc.stderr.strip() or proc.stdout.strip())[-500:]
        raise DeploymentError(f"`flwr {' '.join(args)}` failed: {detail}")
    return answer


def _last_json(text: str) -> Any:
    """The JSON object ``flwr --format json`` printed (after any progress lines)."""
    start = text.find("{")
    while start != -1:
        try:
            return json.loads(text[start:])
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
    return None


def read_node_public_key(path: Path) -> str:
    """A hospital's public key as one OpenSSH line, checked to be EC on a NIST curve."""
    if not path.is_file():
        raise DeploymentError(f"node public key {path} does not exist")
    data = path.read_bytes().strip()
    try:
        key = serialization.load_ssh_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise DeploymentError(f"{path} is not an OpenSSH public key; the hospital makes one with "
                              "`fedcmr-client keygen` and sends its .pub file") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise DeploymentError(f"{path} is not an EC key (Flower authenticates SuperNodes with EC "
                              "keys on NIST curves); make one with `fedcmr-client keygen`")
    return " ".join(data.decode().split()[:2])


def read_registry(folder: ConsortiumDir) -> dict[str, dict[str, Any]]:
    folder.require_initialised()
    if not folder.nodes_file.is_file():
        return {}
    return dict(json.loads(folder.nodes_file.read_text(encoding="utf-8")))


def admit_node(folder: ConsortiumDir, public_key: Path, site: str) -> int:
    """Register a hospital's key with the SuperLink under ``site``; returns Flower's node id."""
    if not SITE_NAME.match(site):
        raise DeploymentError(f"--name '{site}' must be 1-64 letters, digits, '.', '_' or '-'")
    registry = read_registry(folder)
    line = read_node_public_key(public_key)
    if site in registry and not registry[site].get("revoked"):
        raise DeploymentError(f"site '{site}' is already admitted (node {registry[site]['node_id']}); "
                              f"revoke it first to admit a new key")
    for other, entry in registry.items():
        if entry["public_key"] == line and entry.get("revoked"):
            raise DeploymentError(f"this key was revoked (site '{other}', {entry['revoked']}); a "
                                  "revoked key stays revoked: the hospital makes a new one with "
                                  "`fedcmr-client keygen`")
        if entry["public_key"] == line:
            raise DeploymentError(f"this key was already admitted as site '{other}'; every site "
                                  "needs its own key")
    answer = flwr_cli(folder, ["supernode", "register", str(public_key.resolve()), "--name", site])
    node_id = int(answer["node-id"])
    registry[site] = {"public_key": line, "node_id": node_id, "admitted": _now()}
    atomic_write_text(folder.nodes_file, json.dumps(registry, indent=2) + "\n")
    return node_id


def revoke_node(folder: ConsortiumDir, site: str) -> int:
    """Unregister ``site``'s key: the SuperLink refuses that node from now on."""
    registry = read_registry(folder)
    entry = registry.get(site)
    if entry is None or entry.get("revoked"):
        admitted = sorted(s for s, e in registry.items() if not e.get("revoked"))
        raise DeploymentError(f"site '{site}' is not admitted (admitted: {', '.join(admitted) or 'none'})")
    flwr_cli(folder, ["supernode", "unregister", str(entry["node_id"])])
    entry["revoked"] = _now()
    atomic_write_text(folder.nodes_file, json.dumps(registry, indent=2) + "\n")
    return int(entry["node_id"])


def node_status(folder: ConsortiumDir) -> list[dict[str, Any]]:
    """Flower's view of every registered SuperNode (node id, status such as online/registered)."""
    answer = flwr_cli(folder, ["supernode", "list"])
    return list(answer.get("nodes", []))


# ---------------------------------------------------------------- submitting runs

APP_SOURCE = Path(__file__).resolve().parents[1]  # the FedCMR folder whose pyproject.toml holds the app


@dataclass(frozen=True)
class RunRequest:
    """One federation for this consortium's SuperLink: a preset (name or YAML file), the run's
    name (its folder is runs/NAME in the consortium folder) and key=value overrides."""

    preset: str
    name: str
    overrides: tuple[str, ...] = ()
    resume: bool = False


def run_folder(folder: ConsortiumDir, name: str) -> Path:
    if not SITE_NAME.match(name):
        raise DeploymentError(f"run name '{name}' must be letters, digits, '.', '_' or '-' (it names "
                              "a folder under runs/)")
    return folder.root / "runs" / name


def resolved_request(folder: ConsortiumDir, request: RunRequest) -> tuple[str, FedCMRConfig]:
    """The run config ``flwr run`` gets, after checking everything the server app would refuse
    later: the preset and overrides, min_sites, the run folder (new, or resumable)."""
    from server.run_status import RunStatus, read_outcome
    from server.state import CHECKPOINT_FILE

    run_dir = run_folder(folder, request.name)
    preset = str(Path(request.preset).resolve()) if Path(request.preset).is_file() else request.preset
    # a run stopped before its first checkpoint has nothing to continue from: it starts over
    from_checkpoint = request.resume and (run_dir / CHECKPOINT_FILE).is_file()
    overrides = [*request.overrides, *(["output.resume=true"] if from_checkpoint else [])]
    quoted = [o for o in (preset, *overrides) if "'" in o or '"' in o]
    if quoted:
        raise DeploymentError(f"'{quoted[0]}': the run config cannot carry quotes; rename the file "
                              "or drop the quotes (lists as tasks.names=[sax_seg,view])")
    cfg = load_config(preset, [*overrides, f"output.dir={run_dir}"])
    if cfg.federation.min_sites is None:
        raise DeploymentError("set federation.min_sites=N: how many hospitals a round waits for")
    if request.resume:
        if not run_dir.is_dir():
            raise DeploymentError(f"there is no run {run_dir} to resume; start it without --resume")
        outcome = read_outcome(run_dir)
        if outcome is not None and outcome.status in (RunStatus.released, RunStatus.finished):
            raise DeploymentError(f"{run_dir} already {outcome.status.value}; nothing to resume")
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise DeploymentError(f"{run_dir} already holds a run; continue it with --resume or choose "
                              "another --name")
    run_config = (f"preset='{preset}' out-dir='runs/{request.name}' "
                  f"overrides='{' '.join(overrides)}'")
    return run_config, cfg


def submit_run(folder: ConsortiumDir, request: RunRequest, output: TextIO | None = None) -> int:
    """Submit the project's apps to this consortium's SuperLink (``flwr run --stream``) and pass
    the run's log through to ``output`` until it ends; the exit status of ``flwr run``."""
    folder.require_initialised()
    if running_link(folder) is None:
        raise DeploymentError(f"no SuperLink runs from {folder.root}; start it with "
                              f"`fedcmr-server start {folder.root}`")
    project = APP_SOURCE / "pyproject.toml"
    if not project.is_file() or "[tool.flwr.app]" not in project.read_text():
        raise DeploymentError(f"{APP_SOURCE} is not FedCMR's source folder (its pyproject.toml "
                              "defines the apps); install FedCMR from its source (pip install -e .)")
    run_config, _ = resolved_request(folder, request)
    flwr = flower_binary("flwr")
    env = flower_environment(flwr, {"FLWR_HOME": str(folder.flwr_home.resolve())})
    command = [str(flwr), "run", str(APP_SOURCE), CONNECTION, "--stream", "--run-config", run_config]
    sink = output or sys.stdout
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace") as process:
        for line in process.stdout or ():
            sink.write(line)
            sink.flush()
    return process.returncode
