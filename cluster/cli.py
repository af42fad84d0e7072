"""Command line of cluster jobs: `python -m cluster submit | run | status | logs | stop | list | up | down |
render | validate`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from data_prep.configfile import ConfigError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_PREEMPTED = 143

DESCRIPTION = """\
Cluster jobs: data prep, pretraining, fine-tuning and the whole pipeline as one job spec (configs/jobs/).

  python -m cluster submit configs/jobs/quickstart.yaml          # on a local Ray started for the job
  python -m cluster up                                           # a local head for the Jobs API
  python -m cluster submit JOB --address http://HOST:8265 --wait # through the Ray Jobs API
  python -m cluster status ID | logs ID [--follow] | stop ID | list
  python -m cluster render JOB --target kuberay|slurm|ray-up     # for a real cluster

status, logs, stop and list take --address (default: $RAY_ADDRESS, else the head `up` started from this
directory). Every job spec is validated in full, with each config it names, before anything is submitted.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cluster", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def job_args(sp):
        sp.add_argument("job", help="a job spec, e.g. configs/jobs/quickstart.yaml")
        sp.add_argument("overrides", nargs="*", help="KEY=VALUE overrides of the job spec's own keys")

    def address(sp):
        sp.add_argument("--address", help="the cluster's Jobs API, http://HOST:PORT (default: $RAY_ADDRESS, else "
                                          "the head `up` started from this directory)")

    s = sub.add_parser("submit", help="run a job: on a local Ray (no --address) or on a cluster via its Jobs API",
                       description="Validate JOB and run it. Without --address it runs here on a local Ray started "
                                   "for it, printing its progress. With --address it goes to that cluster's Jobs "
                                   "API and the job id is printed; --wait streams its logs and exits with its "
                                   "result. A job with the same name that is still pending or running is "
                                   "reported instead of started twice.")
    s.add_argument("--address", help="a Ray cluster's Jobs API, http://HOST:PORT (none: a local Ray for this job)")
    s.add_argument("--wait", action="store_true", help="stream the logs until the job ends; exit with its result")
    s.add_argument("--name", help="the job's name (default: the spec's name, else the file's)")
    job_args(s)
    r = sub.add_parser("run", help="the job driver (a cluster job's entrypoint); runs JOB on the Ray it is in",
                       description="Run JOB's stages on the Ray this process belongs to ($RAY_ADDRESS, as in a Ray "
                                   "job), else on a local Ray. Without JOB it runs the plan `submit` put in "
                                   "$BERTFORGE_JOB_PLAN.")
    r.add_argument("job", nargs="?", help="a job spec (default: the submitted plan in $BERTFORGE_JOB_PLAN)")
    r.add_argument("overrides", nargs="*", help="KEY=VALUE overrides of the job spec's own keys")
    for name, text in (("status", "a job's state"), ("logs", "a job's output"), ("stop", "stop a job")):
        c = sub.add_parser(name, help=text, description=text)
        c.add_argument("id", help="the job id `submit` printed (see `list`), or a job name: its newest submission")
        address(c)
        if name == "logs":
            c.add_argument("--follow", "-f", action="store_true", help="keep streaming until the job ends")
    address(sub.add_parser("list", help="the cluster's jobs", description="The cluster's jobs, newest last."))
    u = sub.add_parser("up", help="start a local Ray head (loopback, dashboard, token auth) for the Jobs API",
                       description="Start `ray start --head` on loopback with the dashboard and Ray's token "
                                   "authentication (a token generated into .bertforge/auth_token); prints the "
                                   "address to pass as --address. The other commands run from this directory find "
                                   "it without flags.")
    from cluster.head import DEFAULT_DASHBOARD_PORT, DEFAULT_HOST

    u.add_argument("--host", default=DEFAULT_HOST, help=f"loopback address to listen on (default {DEFAULT_HOST})")
    u.add_argument("--dashboard-port", type=int, default=DEFAULT_DASHBOARD_PORT,
                   help="the Jobs API port (default 8265; 0 or a port in use: a free one)")
    u.add_argument("--num-cpus", type=int, help="CPUs the head offers (default: all)")
    u.add_argument("--num-gpus", type=int, help="GPUs the head offers (default: all)")
    u.add_argument("--labels", metavar="KEY=VALUE,...", default="",
                   help="the head node's labels, which a job's resources.node_labels select (e.g. pool=train)")
    sub.add_parser("down", help="stop the head `up` started from this directory",
                   description="Stop the head `up` started from this directory, and the nodes joined to it from "
                               "this machine; other Ray instances are left alone.")
    rd = sub.add_parser("render", help="a KubeRay RayJob, an sbatch script or a Ray cluster-launcher YAML for JOB",
                        description="Write what runs JOB on a real cluster: --target kuberay (a RayJob manifest), "
                                    "slurm (an sbatch script that starts Ray on the allocation and submits the job) "
                                    "or ray-up (a cluster-launcher YAML).")
    rd.add_argument("--target", required=True, choices=("kuberay", "slurm", "ray-up"))
    rd.add_argument("--out", help="write here (default: standard output)")
    job_args(rd)
    v = sub.add_parser("validate", help="check a job spec and every config it names; print what it would run",
                       description="Validate a job file in full (its keys, resources, and each stage's config with "
                                   "its overrides) without starting anything.")
    job_args(v)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if extra:  # KEY=VALUE overrides may follow the options too: `submit JOB --address URL max_failures=3`
        if not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides or ()) + extra
    from cluster.client import ClientError
    from cluster.head import HeadError

    try:
        return COMMANDS[args.command](args)
    except (ConfigError, ClientError, HeadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, ConfigError) else EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _load(args, here: bool = False) -> tuple:
    """(spec, configs, plan) of the job file. `here`: the job runs from this process (a local submit, `run JOB`):
    its runtime_env.env_vars are set here first, as a cluster sets them for a submitted job's processes (a local
    Ray started afterwards hands them to its workers)."""
    from cluster.jobs import load_job, resolve

    overrides = list(args.overrides or ())
    if getattr(args, "name", None):
        overrides.append(f"name={json.dumps(args.name)}")
    spec, configs = load_job(args.job, overrides)
    if here:
        os.environ.update(spec.runtime_env.env_vars)
        if spec.runtime_env.pip:
            print(f"warning: runtime_env.pip ({', '.join(spec.runtime_env.pip)}) is installed for jobs submitted to "
                  "a cluster (--address); this run uses the packages of this environment", file=sys.stderr)
    return spec, configs, resolve(spec, configs, args.job)


def _validate(args) -> int:
    spec, _, plan = _load(args)
    r = spec.resources
    from cluster.runner import task_files_elsewhere, task_problem

    problem = task_problem(plan, here=True)
    if problem:
        print(f"error: {args.job}: stages.finetune's task: {problem}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{args.job}: a valid {spec.kind} job '{plan['name']}'")
    for stage in plan["stages"]:
        if stage["kind"] == "register":
            print(f"  {'register':<10} {stage['name']}" + (f"@{stage['alias']}" if stage["alias"] else ""))
            continue
        st = dict(spec.stage_list())[stage["kind"]]
        over = f" with {' '.join(st.overrides)}" if st.overrides else ""
        print(f"  {stage['kind']:<10} {st.config}{over}")
    gpus = f", {r.gpus:g} GPU" if r.use_gpu else ""
    print(f"  resources  {r.num_workers} worker(s) x ({r.cpus_per_worker:g} CPU{gpus}); {r.nodes} node(s) when "
          f"rendered; "
          f"max_failures {spec.max_failures}; storage {plan['storage']}")
    print(f"  mlflow     {plan['mlflow_uri']}")
    elsewhere = task_files_elsewhere(plan)
    if elsewhere:
        print(f"note: not on this machine: {', '.join(elsewhere)}; so the task's files were not checked here (the "
              f"job checks them where it runs). If {'they' if len(elsewhere) > 1 else 'it'} should be here, check "
              "the path")
    return EXIT_OK


def _drive(plan: dict, local: bool = False) -> int:
    """Run `plan` here (on a Ray started for it with `local`); the exit status says how it ended."""
    from cluster.runner import StageError, run
    from data_prep.dataset import DatasetError
    from data_prep.pipeline import JobError
    from pretrain.checkpoint import CheckpointError
    from pretrain.engine import SetupError

    try:
        outcome = run(plan, local)
    except (StageError, DatasetError, JobError, CheckpointError, SetupError, RuntimeError) as e:
        print(f"error: job '{plan['name']}' failed: {e}", file=sys.stderr)
        return EXIT_FAILED
    unregistered = outcome.get("finetune", {}).get("register_error")
    if unregistered:  # (after the summary: the fine-tune is done, the job is not)
        print(f"error: job '{plan['name']}' failed: the fine-tuned model {outcome['finetune'].get('model')} is "
              f"complete, but registering it failed ({unregistered[:200]}); submit the job again to register it "
              "(nothing is fine-tuned again)", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_PREEMPTED if outcome.get("pretrain", {}).get("preempted") or outcome.get("not_run") else EXIT_OK


def _run(args) -> int:
    from cluster.client import PLAN_ENV

    if args.job:
        return _drive(_load(args, here=True)[2])
    if PLAN_ENV not in os.environ:
        raise ConfigError(f"give a job spec (python -m cluster run JOB), or submit one (${PLAN_ENV} is not set)")
    return _drive(json.loads(os.environ[PLAN_ENV]))


def _on_this_machine(address: str) -> bool:
    """Whether a Jobs API address is a loopback one (127.0.0.0/8, ::1, localhost)."""
    import ipaddress
    from urllib.parse import urlparse

    host = urlparse(address).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _submit(args) -> int:
    from cluster import client as jobs

    _, _, plan = _load(args, here=not args.address)
    if not args.address:
        return _drive(plan, local=True)
    address = jobs.resolve_address(args.address)
    c = jobs.connect(address)
    from cluster.runner import job_stores

    files = [uri for uri in job_stores(plan) if uri.startswith("sqlite:")]  # (a job that does not use MLflow: none)
    if files and not _on_this_machine(address):
        print(f"warning: the job's MLflow store is {files[0]}: a file at that path on the cluster's head, "
              "not on this machine unless the path is on a disk both share. For a store both see, run an MLflow "
              "server and set MLFLOW_TRACKING_URI (here or in the job's runtime_env.env_vars)", file=sys.stderr)
    job_id, started = jobs.submit(c, plan)
    if started:
        print(f"submitted job {job_id} to {address}")
    else:
        print(f"job '{plan['name']}' is already running as {job_id}; not starting a second copy")
    print(f"  python -m cluster status {job_id} --address {address}\n"
          f"  python -m cluster logs {job_id} --follow --address {address}")
    if not args.wait:
        return EXIT_OK
    status = _following(jobs, c, job_id)
    return EXIT_OK if status == "SUCCEEDED" else EXIT_FAILED


def _following(jobs, c, job_id: str) -> str:
    """Follow a job's log to its end and say how it ended (for a job that failed without a log line, e.g. its
    runtime_env's pip install, Ray's reason); Ctrl-C leaves the job running and says so."""
    try:
        status = jobs.follow(c, job_id, sys.stdout)
        print(f"job {job_id}: {status}")
        if status == "FAILED" and not jobs._call(f"reading the logs of '{job_id}'", c.get_job_logs, job_id).strip():
            why = jobs.message_tail(jobs.info(c, job_id).message)
            if why:
                print(f"  {why}")
        return status
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} goes on. Follow it again: python -m cluster logs {job_id} --follow; "
              f"stop it: python -m cluster stop {job_id}", file=sys.stderr)
        raise


def _client(args):
    from cluster import client as jobs

    return jobs, jobs.connect(jobs.resolve_address(args.address))


def _status(args) -> int:
    jobs, c = _client(args)
    job = jobs.info(c, jobs.resolve(c, args.id))
    print(jobs.describe(job))
    if job.status.value == "FAILED" and (why := jobs.last_error(c, job.submission_id)
                                         or jobs.message_tail(job.message)):
        print(f"  {why}\n  (the whole log: python -m cluster logs {job.submission_id})")
    elif job.status.value == "RUNNING":
        stage, line = jobs.progress(jobs._call(f"reading the logs of '{job.submission_id}'", c.get_job_logs,
                                               job.submission_id))
        if stage:
            print(f"  stage {stage}" + (f": {line}" if line else ""))
    return EXIT_OK


def _logs(args) -> int:
    jobs, c = _client(args)
    args.id = jobs.resolve(c, args.id)
    if args.follow:
        status = _following(jobs, c, args.id)
        return EXIT_OK if status == "SUCCEEDED" else EXIT_FAILED
    else:
        jobs.info(c, args.id)
        sys.stdout.write(jobs._call(f"reading the logs of '{args.id}'", c.get_job_logs, args.id))
    return EXIT_OK


def _stop(args) -> int:
    jobs, c = _client(args)
    args.id = jobs.resolve(c, args.id)
    said = f"stopping job {args.id} (pretraining first commits a checkpoint at the end of its step)"
    status = jobs.stop(c, args.id, stopping=lambda: print(said, flush=True))
    print(f"job {args.id}: {status}")
    if status in ("PENDING", "RUNNING"):  # (Ray kills a job's processes STOP_GRACE_S after asking them to stop)
        print(f"error: job {args.id} is still {status} after the stop's grace period; see python -m cluster status "
              f"{args.id}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _list(args) -> int:
    jobs, c = _client(args)
    listed = sorted(jobs._call("listing jobs", c.list_jobs), key=lambda j: j.start_time or 0)
    for j in listed:
        if j.submission_id:  # drivers started by hand (ray.init) have none
            print(jobs.describe(j))
    if not listed:
        print("no jobs")
    return EXIT_OK


def _up(args) -> int:
    from cluster.head import up

    labels = dict(pair.split("=", 1) for pair in args.labels.split(",") if pair)
    if any(not k or not v for k, v in labels.items()) or args.labels.count("=") != len(labels):
        print(f"error: --labels {args.labels!r}: write KEY=VALUE pairs separated by commas", file=sys.stderr)
        return EXIT_USAGE
    s = up(args.host, args.dashboard_port, args.num_cpus, args.num_gpus, labels=labels)
    verb = "is already up" if s.get("already_up") else "is up"
    print(f"Ray head {verb} at {s['address']} (token authentication; token in {s['token_path']})\n"
          f"  submit:     python -m cluster submit configs/jobs/quickstart.yaml --address {s['address']} --wait\n"
          f"  dashboard:  {s['address']}\n"
          f"  add a node: RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={s['token_path']} ray start --address={s['gcs']}"
          f"{' --labels=' + args.labels if args.labels else ''}\n"
          f"  stop:       python -m cluster down")
    return EXIT_OK


def _down(args) -> int:
    from cluster.head import down

    n, state = down()
    print(f"stopped the head ({n} processes); its logs stay in {state['temp_dir']}/session_latest/logs")
    return EXIT_OK


def _render(args) -> int:
    from cluster.render import render

    from cluster.jobs import load_job

    spec, configs = load_job(args.job, list(args.overrides))  # paths stay as written: resolved on the cluster
    text = render(args.target, spec, configs, args.job, list(args.overrides), args.out)
    if args.out:
        from pathlib import Path

        out = Path(args.out)
        if out.is_dir():
            print(f"error: --out {out} is a directory; name the file to write (e.g. {out / 'job.yaml'})",
                  file=sys.stderr)
            return EXIT_USAGE
        out.parent.mkdir(parents=True, exist_ok=True)
        private = bool(spec.runtime_env.env_vars)  # (their values are in it: credentials, often)
        if private:
            out.unlink(missing_ok=True)  # (made anew, readable by its owner only before a byte is in it)
            os.close(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        out.write_text(text)
        print(f"wrote {args.out}" + (" (readable by you only: it holds runtime_env.env_vars' values)" if private
                                     else ""))
    else:
        sys.stdout.write(text)
    return EXIT_OK


COMMANDS = {"submit": _submit, "run": _run, "status": _status, "logs": _logs, "stop": _stop, "list": _list,
            "up": _up, "down": _down, "render": _render, "validate": _validate}
