"""What a client of a Ray cluster (data prep's `ray.address`, the cluster CLI, a job's driver) needs before it
connects: Ray's token authentication, and the host and port an address names; and, before it disconnects, the
workers' last lines."""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path


def host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a GCS address `host:port` (or a client address `ray://host:port`); None for the rest
    ("auto", a URL...), which Ray resolves itself."""
    m = re.fullmatch(r"(?:ray://)?([\w.\-]+):(\d+)", address)
    return (m.group(1), int(m.group(2))) if m else None


def use_cluster_token() -> None:
    """Send Ray's auth token to a cluster that requires one, the way Ray documents it: `RAY_AUTH_MODE=token`
    with the token at `RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token` (the file `ray start` and `ray.init` write).
    Must run before Ray is imported; an explicit `RAY_AUTH_MODE` is left alone."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if token.is_file():
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ.setdefault("RAY_AUTH_TOKEN_PATH", str(token))


class _DropNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def quiet_local_token_notice() -> None:
    """Drop Ray's warning that the local Ray it starts uses token authentication (it does, as it should: the
    warning is news to nobody and is printed by every job)."""
    log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _DropNotice) for f in log.filters):
        log.addFilter(_DropNotice())


def drain_worker_output(quiet_s: float = 1.0, most_s: float = 5.0) -> float:
    """Wait until no worker output has reached this driver for `quiet_s` (at most `most_s`); returns the seconds
    waited. Ray forwards the workers' stdout and stderr a moment late (file, log monitor, GCS, driver), and drops
    what is still on its way when the driver shuts Ray down or exits: a task's last lines, often its result. No
    wait where nothing is forwarded (not connected, or `log_to_driver=False`)."""
    start = last = time.monotonic()

    def heard(_batch) -> None:
        nonlocal last
        last = time.monotonic()

    try:  # where Ray hands each forwarded batch to the driver's printer (no public API says either)
        import ray
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        if not ray.is_initialized() or not any(name == "ray_print_logs" for name, _ in dispatcher.handlers):
            return 0.0
        dispatcher.add_handler("bertforge_drain", heard)
    except Exception:  # noqa: BLE001 (another Ray version's internals: a plain pause)
        time.sleep(quiet_s)
        return quiet_s
    try:
        while (now := time.monotonic()) - last < quiet_s and now - start < most_s:
            time.sleep(0.05)
    finally:
        dispatcher.remove_handler("bertforge_drain")
    return time.monotonic() - start
