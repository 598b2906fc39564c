"""Starting and stopping the stock Flower binaries (``flower-superlink``, ``flower-supernode``).

Neutral ground for ``server`` and ``client``, which may not import each other; it runs the
binaries as OS processes and imports no Flower code itself. What it adds to a bare
``subprocess``: the binary found beside this Python first (the venv that holds FedCMR), a port
checked free before a start, bounded waiting for a TLS endpoint to answer, and a stop that
reaches the children Flower starts (SuperExec, app processes) through the process group.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from shared_model.errors import UserError

STOP_GRACE_S = 15.0  # SIGTERM, then this long before SIGKILL


class LaunchError(UserError, RuntimeError):
    """A Flower binary could not be found, started, reached or stopped."""


def flower_binary(name: str) -> Path:
    """``name`` from this Python's bin folder, else from PATH, else an error saying what to install."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which(name)
    if found is None:
        raise LaunchError(f"'{name}' is not installed beside {sys.executable} nor on PATH; "
                          "install FedCMR's dependencies (pip install -e .) in this environment")
    return Path(found)


def flower_environment(binary: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a Flower process: its bin folder first on PATH (it starts siblings
    such as ``flower-superexec``) and never installing dependencies at run time."""
    env = dict(os.environ)
    env["PATH"] = f"{binary.parent}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env.update(extra or {})
    return env


def check_port_free(host: str, port: int) -> None:
    """An error naming the port if something already listens there."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise LaunchError(f"port {port} on {host} is busy ({exc.strerror}); stop what uses it "
                              "or choose another with --port") from None


def _tls_handshake(host: str, port: int, ca_cert: Path, server_name: str, timeout_s: float) -> None:
    """One TLS handshake with ``host:port``, verified against ``ca_cert`` for ``server_name``;
    raises what ``socket`` / ``ssl`` raise when it fails."""
    context = ssl.create_default_context(cafile=str(ca_cert))
    with socket.create_connection((host, port), timeout=timeout_s) as raw, \
            context.wrap_socket(raw, server_hostname=server_name):
        pass


def tls_answers(host: str, port: int, ca_cert: Path, server_name: str, timeout_s: float = 2.0) -> bool:
    """Whether ``host:port`` completes a TLS handshake with a certificate ``ca_cert`` vouches for."""
    try:
        _tls_handshake(host, port, ca_cert, server_name, timeout_s)
    except (OSError, ssl.SSLError):
        return False
    return True


# OpenSSL's verification codes a node can act on, and what they mean for it
_VERIFY_REASONS = {
    9: "is not valid yet (check this machine's clock)",
    10: "has expired; the consortium must renew it",
    62: "is not valid for the host name {host}; use the address the consortium's certificate names",
    64: "is not valid for the address {host}; use the address the consortium's certificate names",
}


def certificate_problem(host: str, port: int, ca_cert: Path, timeout_s: float = 5.0) -> str | None:
    """Why the TLS server at ``host:port`` fails verification against ``ca_cert`` (expired, not
    yet valid, another host's, or one the CA does not vouch for), checked with Python's ``ssl``,
    the library the SuperNode's transport verifies with; None when it verifies or cannot be
    reached (a server that is not up yet is the SuperNode's to wait for)."""
    try:
        _tls_handshake(host, port, ca_cert, host, timeout_s)
    except ssl.SSLCertVerificationError as exc:
        reason = _VERIFY_REASONS.get(exc.verify_code)
        if reason is not None:
            return f"presents a certificate that {reason.format(host=host)}"
        return f"presents a certificate that {ca_cert} does not vouch for ({exc.verify_message})"
    except ssl.SSLError as exc:
        return f"did not complete a TLS handshake ({exc.reason or exc}); is it the consortium's TLS port?"
    except OSError:
        return None
    return None


def start_detached(command: Sequence[str], log_file: Path, env: Mapping[str, str],
                   cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start ``command`` in its own session (so one signal reaches all its children), output to
    ``log_file`` (appended)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as log:
        try:
            return subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=dict(env), start_new_session=True,
                                    cwd=cwd)
        except OSError as exc:
            raise LaunchError(f"could not start {command[0]}: {exc.strerror}") from None


def wait_until(ready: Callable[[], bool], process: subprocess.Popen[bytes], timeout_s: float,
               what: str, log_file: Path) -> None:
    """Poll ``ready()`` until true; an error with the log's tail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LaunchError(f"{what} exited with status {process.returncode} while starting; "
                              f"the end of {log_file}:\n{log_tail(log_file)}")
        if ready():
            return
        time.sleep(0.5)
    raise LaunchError(f"{what} did not become ready within {timeout_s:.0f} s; it keeps running "
                      f"as process {process.pid}; see {log_file}:\n{log_tail(log_file)}")


def log_tail(log_file: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(log_file.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    return "(no log)"


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, someone else's
    return True


def stop_group(pid: int, grace_s: float = STOP_GRACE_S) -> bool:
    """SIGTERM the process group led by ``pid`` (see :func:`start_detached`), SIGKILL after
    ``grace_s``. Returns False if nothing was running."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it if it is our own child
        if not process_alive(pid):
            break
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)  # the leader's children, and the leader if it ignored TERM
    return True
