"""Ray's token authentication for clients of a cluster (data prep's `ray.address`, the cluster CLI)."""

from __future__ import annotations

import logging
import os
from pathlib import Path


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
