"""Jobs on a Ray cluster through its Jobs API: submit (once per name), status, logs, stop, list.

A job's entrypoint is `python -m cluster run`, the driver, with the resolved plan (every config validated,
every path absolute) in its environment, so the cluster runs exactly what was validated here. A submission
with a name that is already pending or running reports that job instead of starting a second copy (or, when
that job runs another plan, refuses); the submission id is `NAME-N`, N one past the name's earlier jobs, so two
racing submissions collide in Ray rather than both starting.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from cluster.runner import STOP_GRACE_S, WORKER_ENV

PLAN_ENV = "BERTFORGE_JOB_PLAN"
NAME_KEY = "bertforge_name"  # metadata of our submissions
PLAN_KEY = "bertforge_plan"  # ... and a digest of the plan: a running job of the same name and plan is this one
AGENT_WAIT_S = 60.0  # a fresh head takes a few seconds before it accepts jobs


class ClientError(Exception):
    """The cluster cannot be reached, or refused; the message says which address and what to do."""


def resolve_address(given: str | None, cwd: Path | None = None) -> str:
    """--address, else RAY_ADDRESS, else the head `python -m cluster up` started from this directory."""
    from cluster.head import read_state

    address = given or os.environ.get("RAY_ADDRESS")
    if not address:
        state = read_state(cwd)
        if state is None:
            raise ClientError("no cluster address: pass --address http://HOST:PORT (a Ray head's dashboard), set "
                              "RAY_ADDRESS, or start a local head with `python -m cluster up`")
        address = state["address"]
    if "://" not in address:
        address = f"http://{address}"
    return address


def use_token(address: str, cwd: Path | None = None) -> None:
    """Send the right token to `address`: ours when it is the head `up` started here (whatever token settings the
    environment has, e.g. those an in-process `ray.init` leaves), else what Ray reads by default
    (RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token). Must run before `import ray`."""
    from cluster.head import auth_env, read_state
    from data_prep.ray_client import use_cluster_token

    state = read_state(cwd)
    if state and state["address"] == address:
        os.environ.pop("RAY_AUTH_TOKEN", None)  # a token given inline would win over the file
        os.environ.update(auth_env(state["token_path"]))
    else:
        use_cluster_token()


def connect(address: str):
    """A JobSubmissionClient for `address`, or a ClientError that says why not."""
    use_token(address)
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as e:  # noqa: BLE001 (connection refused, DNS, authentication, version: all mean "not there")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        token = os.environ.get("RAY_AUTH_TOKEN_PATH")
        if "uthentication" in str(e):
            hint = (f"RAY_AUTH_TOKEN_PATH={token} is no file" if token and not Path(token).is_file() else
                    "the cluster requires a token: set RAY_AUTH_TOKEN_PATH to its token file")
        else:
            hint = ("is the head up? (python -m cluster up, or check --address: the head's dashboard address, "
                    "http://HOST:8265 by default, not the GCS port 6379 that `ray start` prints)")
        raise ClientError(f"cannot reach a Ray cluster at {address}: {first}; {hint}") from None


def _call(what: str, fn, *args, **kwargs):
    """A Jobs API call with Ray's HTTP errors turned into one-line messages."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:
        text = str(e)
        m = re.search(r"Job (\S+) does not exist", text)
        if m:
            raise ClientError(f"no job '{m.group(1)}' on this cluster (`python -m cluster list` shows its jobs)") \
                from None
        raise ClientError(f"{what} failed: {text.strip().splitlines()[-1][:300]}") from None
    except OSError as e:
        raise ClientError(f"{what} failed: the cluster stopped answering ({e})") from None


def jobs_named(client, name: str) -> list:
    return [j for j in _call("listing jobs", client.list_jobs) if (j.metadata or {}).get(NAME_KEY) == name]


def submission_env(plan: dict[str, Any]) -> dict[str, str]:
    """The env_vars of the driver's runtime environment: the job's own, the plan, and Ray's grace for a stopped
    driver (the time pretraining's workers need to commit a checkpoint)."""
    return {**WORKER_ENV, "RAY_JOB_STOP_WAIT_TIME_S": str(STOP_GRACE_S), **plan["spec"]["runtime_env"]["env_vars"],
            PLAN_ENV: json.dumps(plan)}


def submission_metadata(plan: dict[str, Any]) -> dict[str, str]:
    """The job's metadata, by which `status`, `list` and the next submission find it: its name, its kind and a
    digest of its plan (what runs, not how the job file's path was typed)."""
    from data_prep.configfile import config_hash

    digest = config_hash({k: v for k, v in plan.items() if k != "job_file"})[:16]
    return {NAME_KEY: plan["name"], "bertforge_kind": plan["kind"], PLAN_KEY: digest}


def submit(client, plan: dict[str, Any]) -> tuple[str, bool]:
    """Submit the plan's driver; returns (submission id, True) or, when a job of that name is pending or running,
    (its id, False)."""
    metadata = submission_metadata(plan)
    name, digest = plan["name"], metadata[PLAN_KEY]
    for _ in range(3):
        mine = jobs_named(client, name)
        active = [j for j in mine if not j.status.is_terminal()]
        if active:
            theirs = (active[0].metadata or {}).get(PLAN_KEY)
            if theirs and theirs != digest:
                raise ClientError(f"job '{name}' is running as {active[0].submission_id} with another plan (another "
                                  "spec, config or override): stop it first (python -m cluster stop "
                                  f"{active[0].submission_id}), or submit this one under another name (--name)")
            return active[0].submission_id, False
        numbers = [int(m.group(1)) for j in mine if (m := re.fullmatch(rf"{re.escape(name)}-(\d+)", j.submission_id))]
        # past every listed one (a deleted job is not listed: the newest one's number comes back)
        sid = f"{name}-{max(numbers, default=len(mine)) + 1}"
        runtime_env: dict[str, Any] = {"env_vars": submission_env(plan)}
        if plan["spec"]["runtime_env"]["pip"]:
            runtime_env["pip"] = list(plan["spec"]["runtime_env"]["pip"])
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                client.submit_job(entrypoint="python -m cluster run", submission_id=sid, runtime_env=runtime_env,
                                  metadata=metadata)
                return sid, True
            except RuntimeError as e:
                if "No available agent" in str(e) and time.monotonic() < deadline:
                    time.sleep(1.0)  # a head that has just started: its job agent is not registered yet
                    continue
                if "already exists" not in str(e):
                    raise ClientError(f"submitting '{name}' failed: {str(e).strip().splitlines()[-1][:300]}") \
                        from None
                break  # another submission of the same name won the id: look again
    raise ClientError(f"could not pick a submission id for '{name}': jobs of that name keep appearing")


def info(client, job_id: str):
    return _call(f"reading job '{job_id}'", client.get_job_info, job_id)


def resolve(client, ident: str) -> str:
    """The submission id `ident` names: itself, or, for a job name, its newest submission's."""
    try:
        return info(client, ident).submission_id
    except ClientError:
        mine = sorted(jobs_named(client, ident), key=lambda j: j.start_time or 0)
        if not mine:
            raise
        return mine[-1].submission_id


def last_error(client, job_id: str) -> str | None:
    """The line of a failed job's log that says why: its last `error:` line, else its last line."""
    lines = [ln.strip() for ln in _call(f"reading the logs of '{job_id}'", client.get_job_logs, job_id).splitlines()]
    lines = [ln for ln in lines if ln]
    return next((ln for ln in reversed(lines) if ln.startswith("error:")), lines[-1] if lines else None)


ANSI = re.compile(r"\x1b\[[0-9;]*m")
RAY_PREFIX = re.compile(r"^\((\w+) pid=\d+[^)]*\)\s*")  # "(RayTrainWorker pid=123, ip=...) " before a line


def plain_lines(logs: str) -> list[str]:
    """A job's log lines as its processes wrote them: without Ray's colours and "(Actor pid=N)" prefixes."""
    return [RAY_PREFIX.sub("", ANSI.sub("", line)).strip() for line in logs.splitlines()]


def progress(logs: str) -> tuple[str | None, str | None]:
    """(the stage a running job is in, its last progress line) from its log."""
    lines = plain_lines(logs)
    starts = [i for i, line in enumerate(lines) if re.fullmatch(r"== stage: \w+ ==", line)]
    if not starts:
        return None, None
    stage = lines[starts[-1]].split(": ", 1)[1].rstrip(" =")
    said = [line for line in lines[starts[-1] + 1:] if line and not line.startswith(("Requesting resources",
                                                                                    "Attempting to start", "- (ip="))]
    return stage, (said[-1][:200] if said else None)


def message_tail(message: str | None, lines: int = 3) -> str | None:
    """The last lines of Ray's message for a job, less its boilerplate first line: why a job that wrote no log
    failed (a runtime_env whose pip install failed, say)."""
    said = [line.strip() for line in (message or "").strip().splitlines()[1:] if line.strip()]
    return " | ".join(said[-lines:])[:500] if said else None


def _headline(message: str) -> str:
    """A job's message in a line: a failed job's own last `error:` line (Ray's message quotes the end of its log
    after a line of its own), else the message's first line."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    said = [line for line in lines if line.startswith("error: ")]
    return said[-1] if said else lines[0] if lines else ""


def describe(job) -> str:
    took = ""
    if job.start_time:
        end = job.end_time or time.time() * 1000
        took = f", {(end - job.start_time) / 1000:.0f}s"
    msg = f": {_headline(job.message)[:200]}" if job.message and job.status.is_terminal() else ""
    name = (job.metadata or {}).get(NAME_KEY)
    return f"{job.submission_id}  {job.status.value}{took}" + (f"  ({name})" if name else "") + msg


def stop(client, job_id: str, timeout_s: float = STOP_GRACE_S + 30, stopping=None) -> str:
    """Stop a pending or running job and wait until it has ended (a pretraining job first commits a checkpoint);
    returns its final status. `stopping()` is called once the job is known to be still running."""
    job = info(client, job_id)
    if job.status.is_terminal():
        raise ClientError(f"job '{job_id}' already ended ({job.status.value}); nothing to stop")
    if stopping:
        stopping()
    _call(f"stopping job '{job_id}'", client.stop_job, job_id)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = info(client, job_id)
        if job.status.is_terminal():
            return job.status.value
        time.sleep(0.5)
    return info(client, job_id).status.value


def follow(client, job_id: str, out) -> str:
    """Stream the job's logs to `out` until it ends; returns its final status."""
    import asyncio

    async def tail():
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    info(client, job_id)  # an unknown id is a message, not a stack trace
    try:
        asyncio.run(tail())
    except Exception:  # noqa: BLE001 (the log stream closing early is not the job's result)
        pass
    while not (job := info(client, job_id)).status.is_terminal():
        time.sleep(0.5)
    return job.status.value
