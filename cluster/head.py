"""A local Ray head for the Jobs API on one machine: `python -m cluster up` / `down`, with token authentication.

`up` generates a token the way Ray documents it (`RAY_AUTH_MODE=token`, the token in the file at
`RAY_AUTH_TOKEN_PATH`), starts `ray start --head` with the dashboard on loopback, and records what it started in
`.bertforge/head.json` of the working directory, so `submit/status/logs/stop/list` run from there find the head
and its token without flags. `down` stops exactly that head's processes (and any node joined to it from this
machine), never other Ray instances: `ray stop` would end every Ray process on the machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

STATE_DIR = ".bertforge"
STATE_FILE = "head.json"
TOKEN_FILE = "auth_token"
DEFAULT_DASHBOARD_PORT = 8265
# Linux routes all of 127.0.0.0/8 to loopback. Ray replaces 127.0.0.1 as a node address with the machine's
# own address, so a head that should stay on loopback uses another address of the range where there is one.
DEFAULT_HOST = "127.0.0.2" if sys.platform.startswith("linux") else "127.0.0.1"


class HeadError(Exception):
    """The head could not be started or stopped; the message says why and what to do."""


def state_dir(cwd: Path | None = None) -> Path:
    return Path(cwd or Path.cwd()) / STATE_DIR


def read_state(cwd: Path | None = None) -> dict[str, Any] | None:
    path = state_dir(cwd) / STATE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def auth_env(token_path: str | Path) -> dict[str, str]:
    """What a Ray process (head, node, client) needs in its environment to use the token; set before `import ray`."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}


def _ray_executable() -> str:
    here = Path(sys.executable).parent / "ray"
    found = str(here) if here.is_file() else shutil.which("ray")
    if not found:
        raise HeadError("the `ray` command is not installed in this environment (pip install 'ray[default]')")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now at `host`."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0


def _temp_dir(cwd: Path) -> str:
    # Short and unique per directory: Ray puts unix sockets under it (107-byte path limit).
    return str(Path(tempfile.gettempdir()) / f"bertforge-ray-{hashlib.sha1(str(cwd).encode()).hexdigest()[:8]}")


def up(host: str = DEFAULT_HOST, dashboard_port: int = DEFAULT_DASHBOARD_PORT, num_cpus: int | None = None,
       num_gpus: int | None = None, cwd: Path | None = None, timeout_s: float = 90.0,
       labels: dict[str, str] | None = None) -> dict[str, Any]:
    """Start a head (or find the one already up from `cwd`); returns its state: address, gcs, token_path, ...
    `labels` are the head node's Ray labels (what a job's resources.node_labels select)."""
    cwd = Path(cwd or Path.cwd()).resolve()
    current = read_state(cwd)
    if current and _reachable(current):
        return {**current, "already_up": True}
    sdir = state_dir(cwd)
    sdir.mkdir(exist_ok=True)
    token = sdir / TOKEN_FILE
    if not token.is_file():
        # Written beside and linked into place: the token file is never seen empty, and of two `up`s at once the
        # first to link wins (the other uses its token).
        part = sdir / f"{TOKEN_FILE}.{os.getpid()}.partial"
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))  # 256 bits, the size Ray's own generator uses
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(part, token)
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links: a rename, which the last of two `up`s at once wins
            os.replace(part, token)
        part.unlink(missing_ok=True)
    if dashboard_port == 0 or _port_in_use(host, dashboard_port):
        if dashboard_port:
            print(f"port {dashboard_port} on {host} is in use; the dashboard takes a free port instead",
                  file=sys.stderr)
        dashboard_port = free_port(host)
    gcs_port = free_port(host)
    temp = _temp_dir(cwd)
    cmd = [_ray_executable(), "start", "--head", f"--node-ip-address={host}", f"--port={gcs_port}",
           "--include-dashboard=true", f"--dashboard-host={host}", f"--dashboard-port={dashboard_port}",
           f"--ray-client-server-port={free_port(host)}", f"--temp-dir={temp}", "--disable-usage-stats",
           # Free ports rather than Ray's fixed defaults (52365 for the job agent): another Ray on the machine
           # holding them would leave the head without an agent, refusing every job.
           f"--dashboard-agent-listen-port={free_port(host)}"]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        cmd.append(f"--num-gpus={num_gpus}")
    if labels:
        cmd.append("--labels=" + ",".join(f"{k}={v}" for k, v in labels.items()))
    env = node_env(token)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    if out.returncode != 0:
        raise HeadError(f"`ray start --head` failed (exit {out.returncode}):\n{(out.stderr or out.stdout)[-2000:]}")
    state = {"address": f"http://{host}:{dashboard_port}", "gcs": f"{host}:{gcs_port}", "host": host,
             "token_path": str(token), "temp_dir": temp, "cwd": str(cwd), "started": time.time()}
    tmp = sdir / (STATE_FILE + ".partial")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, sdir / STATE_FILE)
    deadline = time.monotonic() + timeout_s
    while not _reachable(state):
        if time.monotonic() > deadline:
            down(cwd)
            raise HeadError(f"the head started but its dashboard at {state['address']} did not answer within "
                            f"{timeout_s:.0f}s; see the logs in {temp}/session_latest/logs/dashboard.log")
        time.sleep(0.5)
    return state


def node_env(token: str | Path) -> dict[str, str]:
    """The environment of a `ray start` of ours: the token, and this environment's executables first on PATH,
    so a job's `python -m cluster run` entrypoint runs with the same installation."""
    bindir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a new head joins no other cluster
    return {**env, **auth_env(token), "RAY_USAGE_STATS_ENABLED": "0", "PATH": bindir + os.pathsep + env.get("PATH", "")}


def _reachable(state: dict[str, Any], timeout_s: float = 2.0) -> bool:
    """Whether the head's dashboard answers, with our token (Ray's HTTP endpoints take it as a bearer token)."""
    import urllib.request

    try:
        token = Path(state["token_path"]).read_text().strip()
        req = urllib.request.Request(state["address"] + "/api/version",
                                     headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return r.status == 200
    except OSError:
        return False


def head_processes(state: dict[str, Any]) -> list:
    """The processes of this head and of every node joined to it from this machine, with their children."""
    import psutil

    marks = (state["temp_dir"], f"--address={state['gcs']}", f"--gcs-address={state['gcs']}",
             f"--gcs_server_address={state['gcs']}")
    roots = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or ())
        if any(m in cmd for m in marks) and p.pid != os.getpid():
            roots.append(p)
    seen = {p.pid: p for p in roots}
    for p in roots:
        try:
            seen.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.Error:
            pass
    return list(seen.values())


def kill_and_wait(procs: list) -> None:
    """SIGKILL each of `procs` (psutil processes; those gone already are skipped) and wait for them to end."""
    import psutil

    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=5)


def down(cwd: Path | None = None, grace_s: float = 5.0) -> tuple[int, dict[str, Any]]:
    """Stop the head started from `cwd` (and its nodes on this machine); returns how many processes were stopped,
    and the state the head had (its `temp_dir` keeps its logs)."""
    import psutil

    cwd = Path(cwd or Path.cwd()).resolve()
    state = read_state(cwd)
    if state is None:
        raise HeadError(f"no head was started from {cwd} (no {STATE_DIR}/{STATE_FILE}); nothing to stop")
    procs = head_processes(state)
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    kill_and_wait(alive)
    (state_dir(cwd) / STATE_FILE).unlink(missing_ok=True)
    return len(procs), state
