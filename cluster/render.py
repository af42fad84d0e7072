"""What runs a job on a real cluster: a KubeRay `RayJob`, a Slurm `sbatch` script, a Ray cluster-launcher YAML.

Each carries the job's resources: one Ray worker node (pod, Slurm node, machine) per `resources.nodes`, each
offering `workers_per_node` x the per-worker CPUs, GPUs and memory; and Ray's token authentication on every
node. KubeRay gets the resolved plan in the job's environment (configs inlined, paths under the storage mount),
so the image needs the project installed but not its config files; Slurm and the cluster launcher submit the
job file from a directory every node shares.
"""

from __future__ import annotations

import copy
import math
import os
import shlex
from pathlib import Path

import yaml

from cluster.client import submission_env, submission_metadata
from cluster.jobs import JobSpec, job_name, resolve
from data_prep.configfile import ConfigError
from data_prep.storage import is_remote

RAY_PORT, DASHBOARD_PORT = 6379, 8265
# Where a job asks for memory, a node's Ray is told exactly what the workers ask for, and a fixed object store (the
# jobs pass only small records through it). By itself Ray takes 30% of the machine's memory (or of the pod's) for
# the store: out of what the workers need, or on top of the pod's limit. The node (pod, Slurm allocation) holds
# both and Ray's own processes: HEADROOM_GB.
OBJECT_STORE_GB, HEADROOM_GB = 4, 8


def ray_version() -> str:
    """The Ray this project runs with here: the version the cluster's image should have (token auth: 2.52+)."""
    from importlib.metadata import version

    return version("ray")
MOUNT = "/mnt/bertforge"  # where a relative storage lives on KubeRay pods
# The ReadWriteMany volume every job's pods mount: one for all jobs, so a job
# reads what an earlier one wrote under the same storage
CLAIM = "bertforge-storage"
# How long a finished job's Ray cluster (its dashboard) is kept before the operator deletes it, GPUs and all
TTL_AFTER_FINISHED_S = 120


def _inputs(plan: dict) -> list[str]:
    """The files and folders a plan's stages read that no earlier stage writes (what a volume must hold first)."""
    out = []
    for stage in plan["stages"]:
        c = stage.get("config", {})
        if stage["kind"] == "data_prep":
            out += c["inputs"] + ([c["tokenizer"]["path"]] if c["tokenizer"]["path"] else [])
        elif stage["kind"] == "pretrain" and not any(s["kind"] == "data_prep" for s in plan["stages"]):
            out.append(c["data"]["dataset"])
        elif stage["kind"] == "finetune":
            out += [c["task"][split] for split in ("train", "validation", "test") if c["task"][split]]
            if not c["model"].startswith(("models:/", "runs:/")):
                out.append(c["model"])
    return out


def _node_resources(spec: JobSpec) -> dict[str, float]:
    r = spec.resources
    # (rounded up: a node, a pod and Ray's --num-cpus/--num-gpus count whole CPUs and GPUs; workers of 0.5 GPU
    # each share one)
    out = {"cpus": math.ceil(r.cpus_per_worker * r.workers_per_node), "gpus": math.ceil(r.gpus * r.workers_per_node)}
    if r.memory_bytes:
        out["memory_bytes"] = r.memory_bytes * r.workers_per_node  # (what Ray is told: exactly the workers' asks)
    return out


def _memory(res: dict[str, float]) -> dict[str, str]:
    """`ray start`'s memory flags for a node of `res` (none when the job asks for no memory)."""
    if not res.get("memory_bytes"):
        return {}
    return {"memory": str(res["memory_bytes"]), "object-store-memory": str(OBJECT_STORE_GB * 2**30)}


def _flags(params: dict[str, str]) -> str:
    return "".join(f" --{k}={v}" for k, v in params.items())


def _node_memory_gb(res: dict[str, float]) -> float | None:
    """What a node (pod, Slurm allocation) must hold: the workers' memory, Ray's object store and its processes."""
    return res["memory_bytes"] / 2**30 + OBJECT_STORE_GB + HEADROOM_GB if res.get("memory_bytes") else None


def _labels(spec: JobSpec) -> str:
    return ",".join(f"{k}={v}" for k, v in spec.resources.node_labels.items())


def _command(job: str, overrides: list[str], address: str) -> str:
    """`python -m cluster submit JOB ... --address ADDRESS --wait`; ADDRESS may hold shell variables."""
    parts = " ".join(shlex.quote(p) for p in ["python", "-m", "cluster", "submit", job, *overrides])
    return f'{parts} --address "{address}" --wait'


class _Literal(str):
    """A multi-line string written as a YAML block (`|`), so an embedded document stays readable."""


yaml.SafeDumper.add_representer(_Literal, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|"))


def kuberay(spec: JobSpec, configs: dict, job: str, overrides: list[str], file: str | None = None) -> str:
    name = job_name(spec, job)
    remote = is_remote(spec.storage)  # an object store: no shared volume, every pod reads and writes the bucket
    storage = spec.storage if remote or Path(spec.storage).is_absolute() else f"{MOUNT}/{spec.storage}"
    # The volume at MOUNT, a relative storage a folder in it; an absolute storage elsewhere gets the volume's folder
    # of its own path (its subPath), so two jobs of one storage share their files and jobs of two do not
    volume_mount = {"name": "storage", "mountPath": MOUNT}
    if not remote and not Path(storage).is_relative_to(MOUNT):
        volume_mount = {"name": "storage", "mountPath": storage, "subPath": storage.strip("/")}
    env = dict(spec.runtime_env.env_vars)
    if remote and "MLFLOW_TRACKING_URI" not in env:
        raise ConfigError(f"storage {storage} is an object store, so there is no shared volume for a local MLflow "
                          "store: set runtime_env.env_vars.MLFLOW_TRACKING_URI to your tracking server")
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{storage}/mlflow.db")  # a file on the shared volume
    spec_for_pods = spec.model_copy(update={"storage": storage, "name": name,
                                            "runtime_env": spec.runtime_env.model_copy(update={"env_vars": env})})
    plan = resolve(spec_for_pods, configs, job, cwd=Path(storage), environ={})
    shared_sqlite = any(s.get("config", {}).get("mlflow", {}).get("tracking_uri", "").startswith("sqlite:")
                        for s in plan["stages"])  # (the stages that record in MLflow)
    res = _node_resources(spec)
    image = spec.runtime_env.image or "bertforge:latest"

    def container(role: str, cpus: float, gpus: float, memory_gb: float | None) -> dict:
        limits: dict[str, str | int] = {"cpu": f"{cpus:g}"}
        if memory_gb:
            limits["memory"] = f"{memory_gb:g}Gi"
        if gpus:
            limits["nvidia.com/gpu"] = int(gpus)
        return {"name": f"ray-{role}", "image": image, "resources": {"limits": limits, "requests": dict(limits)},
                "volumeMounts": [] if remote else [dict(volume_mount)]}

    volumes = [] if remote else [{"name": "storage", "persistentVolumeClaim": {"claimName": CLAIM}}]
    # The head runs the driver (2 CPUs of its own); for data prep its tasks too, so its pod gets what it offers.
    head_cpus = 0 if spec.kind != "data_prep" else res["cpus"]
    head_memory = 8 + (res.get("memory_bytes", 0) / 2**30 if spec.kind == "data_prep" else 0)
    manifest = {
        "apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": name},
        "spec": {
            "entrypoint": "python -m cluster run",
            "metadata": submission_metadata(plan),  # (so `python -m cluster status/list NAME` find it)
            "runtimeEnvYAML": _Literal(yaml.safe_dump(
                {**({"pip": spec.runtime_env.pip} if spec.runtime_env.pip else {}),
                 "env_vars": submission_env(plan)}, width=10**6)),
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": TTL_AFTER_FINISHED_S,
            "rayClusterSpec": {
                # Ray's token authentication, kept by the operator: it makes the token's Secret and gives it to
                # every Ray container and to the job submitter.
                "rayVersion": ray_version(),
                "authOptions": {"mode": "token"},
                "headGroupSpec": {
                    "rayStartParams": {"num-cpus": str(int(head_cpus))},
                    "template": {"spec": {"containers": [container("head", 2 + head_cpus, 0, head_memory)],
                                          "volumes": copy.deepcopy(volumes)}},
                },
                "workerGroupSpecs": [{
                    "groupName": "workers", "replicas": spec.resources.nodes, "minReplicas": spec.resources.nodes,
                    "maxReplicas": spec.resources.nodes, "rayStartParams": _memory(res),
                    **({"labels": dict(spec.resources.node_labels)} if spec.resources.node_labels else {}),
                    "template": {"spec": {"containers": [container("worker", res["cpus"], res["gpus"],
                                                                   _node_memory_gb(res))],
                                          "volumes": copy.deepcopy(volumes)}},
                }],
            },
        },
    }
    head = (f"# KubeRay RayJob for job '{name}' ({spec.kind}): {spec.resources.num_workers} worker(s) on "
            f"{spec.resources.nodes} node pod(s).\n"
            f"# Needs KubeRay 1.5.1 or newer (authOptions) and Ray {ray_version()} in the image. Before "
            f"`kubectl apply -f {file or name + '.yaml'}`:\n"
            + (f"#   credentials for {storage} in the pods (e.g. runtime_env.env_vars, or the nodes' cloud identity)\n"
               if remote else
               f"#   the PersistentVolumeClaim '{CLAIM}' (ReadWriteMany; " + (f"its folder {volume_mount['subPath']} mounted at {storage}" if "subPath" in volume_mount
                                    else f"mounted at {MOUNT}") + "), "
               f"holding {', '.join(_inputs(plan)) or 'nothing yet'}\n")
            + f"#   an image '{image}' with this project installed (runtime_env.image sets another)\n"
            + ("# MLflow is a sqlite file on the volume, written from the head pod and a worker pod: sqlite's locks "
               "are not\n# reliable on network filesystems, so for real runs set runtime_env.env_vars.MLFLOW_TRACKING_URI "
               "to a\n# tracking server\n" if shared_sqlite else ""))
    return head + yaml.safe_dump(manifest, sort_keys=False, width=120)


def slurm(spec: JobSpec, configs: dict, job: str, overrides: list[str], file: str | None = None) -> str:
    name = job_name(spec, job)
    res = _node_resources(spec)
    nodes = spec.resources.nodes
    lines = ["#!/bin/bash", f"#SBATCH --job-name={name}", f"#SBATCH --nodes={nodes}", "#SBATCH --ntasks-per-node=1",
             f"#SBATCH --cpus-per-task={int(res['cpus']) + 1}",  # one more CPU for Ray's own processes
             "#SBATCH --exclusive"]  # (Ray's ports are fixed: one Ray node per machine)
    if res["gpus"]:
        lines.append(f"#SBATCH --gpus-per-node={int(res['gpus'])}")
    if res.get("memory_bytes"):
        lines.append(f"#SBATCH --mem={math.ceil(_node_memory_gb(res))}G")
    lines.append("#SBATCH --output=%x-%j.out")
    # ten minutes before the time limit (the partition's, or sbatch --time), USR1 to this script: it stops the job as
    # `python -m cluster stop` does, so pretraining commits a checkpoint before Slurm ends every process
    lines.append("#SBATCH --signal=B:USR1@600")
    env = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in spec.runtime_env.env_vars.items())
    node = (f"--num-cpus={int(res['cpus'])}" + (f" --num-gpus={int(res['gpus'])}" if res["gpus"] else "")
            + _flags(_memory(res))
            + (f" --labels={shlex.quote(_labels(spec))}" if spec.resources.node_labels else ""))
    api = "http://${head_ip}:" + str(DASHBOARD_PORT)
    body = f"""
# Job '{name}' ({spec.kind}): {spec.resources.num_workers} worker(s) on {nodes} node(s). Submit from the project
# directory on a filesystem every node mounts: sbatch {file or name + '.sbatch'}
# To stop it keeping its progress (pretraining commits a checkpoint; submitting again resumes), signal this script:
#   scancel --batch --signal=USR1 JOBID      (a plain scancel or a preemption ends every process at once)
set -euo pipefail
cd "${{SLURM_SUBMIT_DIR:-.}}"
# (since Slurm 22.05, srun does not take --cpus-per-task from the allocation: Ray would get one CPU)
export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"
{env}# Ray's token authentication: a fresh token for this allocation, on the shared filesystem, readable by you only.
export RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0
mkdir -p .bertforge && umask 077
export RAY_AUTH_TOKEN_PATH="$PWD/.bertforge/slurm-$SLURM_JOB_ID.token"
pids=()
trap 'kill ${{pids[@]+"${{pids[@]}}"}} 2>/dev/null || true; rm -f "$RAY_AUTH_TOKEN_PATH"' EXIT
python -c 'import secrets; print(secrets.token_hex(32))' > "$RAY_AUTH_TOKEN_PATH"

mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
# the first node's first IPv4 address, not a loopback one (hostname --ip-address may list IPv6 ones too)
head_ip=$(srun --nodes=1 --ntasks=1 -w "${{hosts[0]}}" hostname --ip-address \\
          | awk '{{for (i = 1; i <= NF; i++)
                     if ($i ~ /^[0-9]+\\.[0-9]+\\.[0-9]+\\.[0-9]+$/ && $i !~ /^127\\./) {{print $i; exit}}}}')
if [ -z "$head_ip" ]; then
  echo "error: ${{hosts[0]}} has no IPv4 address (hostname --ip-address) for the Ray head" >&2
  exit 1
fi
srun --nodes=1 --ntasks=1 -w "${{hosts[0]}}" --export=ALL \\
    ray start --head --block --node-ip-address="$head_ip" --port={RAY_PORT} --dashboard-host="$head_ip" \\
    --dashboard-port={DASHBOARD_PORT} --disable-usage-stats \\
    {node} &
pids+=($!)
sleep 10
for host in "${{hosts[@]:1}}"; do
  srun --nodes=1 --ntasks=1 -w "$host" --export=ALL \\
      ray start --block --address="$head_ip:{RAY_PORT}" --disable-usage-stats \\
      {node} &
  pids+=($!)
done

# Wait until all {nodes} node(s) have joined, then run the job through the Jobs API and wait for its result.
joined=
for _ in $(seq 120); do
  python - "$head_ip:{RAY_PORT}" {nodes} <<'PY' && {{ joined=1; break; }}
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
sys.exit(0 if sum(n["Alive"] for n in ray.nodes()) >= int(sys.argv[2]) else 1)
PY
  sleep 5
done
if [ -z "$joined" ]; then
  echo "error: not all {nodes} node(s) joined the Ray head at $head_ip within 10 minutes (see their lines above)" >&2
  exit 1
fi
{_command(job, overrides, api)} &
submit=$!
trap 'signalled=1; echo "signalled: stopping job {name}" >&2
      python -m cluster stop {shlex.quote(name)} --address "{api}" || true' USR1 TERM
while :; do  # (a signal ends the wait early: wait again, for the job's own status, which bash keeps once it ends)
  signalled=
  wait "$submit" && status=0 || status=$?
  [ -n "$signalled" ] || break
done
exit "$status"
"""
    return "\n".join(lines) + "\n" + body


def ray_up(spec: JobSpec, configs: dict, job: str, overrides: list[str], file: str | None = None) -> str:
    name = job_name(spec, job)
    file = file or f"{name}.yaml"
    res = _node_resources(spec)
    nodes = spec.resources.nodes
    labels = f" --labels={shlex.quote(_labels(spec))}" if spec.resources.node_labels else ""
    gpus = f" --num-gpus={int(res['gpus'])}" if res["gpus"] else ""
    auth = "RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0"
    conf = {
        "cluster_name": name,
        # On-premises machines: one node type, every listed worker kept (Ray refuses available_node_types here).
        # For a cloud, replace the provider block (type: aws | gcp | azure, region ...) and add the node types.
        "provider": {"type": "local", "head_ip": "HEAD_IP", "worker_ips": [f"WORKER_IP_{i + 1}" for i in range(nodes)]},
        "min_workers": nodes,
        "max_workers": nodes,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 10,
        "auth": {"ssh_user": "USER"},
        "file_mounts": {"~/bertforge": ".", "~/.ray/auth_token": ".bertforge/auth_token"},
        # (not the local virtualenv, git history or tokens: the nodes install the project themselves)
        "rsync_exclude": [".venv", ".git", "__pycache__", "*.egg-info", ".bertforge"],
        "setup_commands": ["pip install -e ~/bertforge"]
        + ([f"pip install {' '.join(shlex.quote(p) for p in spec.runtime_env.pip)}"] if spec.runtime_env.pip else []),
        "head_start_ray_commands": ["ray stop",
                                    f"{auth} ray start --head --port={RAY_PORT} --num-cpus=0 "
                                    f"--dashboard-port={DASHBOARD_PORT} --autoscaling-config=~/ray_bootstrap_config.yaml "
                                    "--disable-usage-stats"],
        "worker_start_ray_commands": ["ray stop",
                                      f"{auth} ray start --address=$RAY_HEAD_IP:{RAY_PORT} "
                                      f"--num-cpus={int(res['cpus'])}{gpus}{_flags(_memory(res))}{labels} "
                                      "--disable-usage-stats"],
    }
    # The job is submitted on the head, from the project as the nodes have it: its relative paths are resolved
    # there (and storage looked at), not on the machine that runs `ray up`.
    there = os.path.relpath(Path(job).resolve(), Path.cwd().resolve())
    if there.startswith(".."):
        raise ConfigError(f"{job}: for ray-up the job file must be under the working directory, which `ray up` "
                          "syncs to the head as ~/bertforge, where the job is submitted: render (and run `ray up`) "
                          "from a directory that holds it")
    submit = f"cd ~/bertforge && RAY_AUTH_MODE=token {_command(there, overrides, f'http://127.0.0.1:{DASHBOARD_PORT}')}"
    head = (f"# Ray cluster launcher config for job '{name}' ({spec.kind}): {nodes} worker node(s) of "
            f"{res['cpus']:g} CPUs" + (f", {res['gpus']:g} GPUs" if res["gpus"] else "") + ".\n"
            "# Fill in HEAD_IP / WORKER_IP_n / USER (or a cloud provider), then, from the project directory:\n"
            "#   mkdir -p .bertforge && (umask 077; python -c 'import secrets; print(secrets.token_hex(32))' "
            "> .bertforge/auth_token)\n"
            f"#   ray up {file} -y\n"
            f"#   ray exec {file} {shlex.quote(submit)}\n"
            "# The job goes on if that connection drops; `status` (also logs, stop, list) follows it:\n"
            f"#   ray exec {file} 'RAY_AUTH_MODE=token python -m cluster status {name} --address "
            f"http://127.0.0.1:{DASHBOARD_PORT}'\n"
            "# The head must reach the workers over SSH as USER (set auth.ssh_private_key to give it a key).\n"
            "# Storage (spec.storage): a filesystem every machine mounts at the same path, or an object-store URL\n"
            "# with credentials on every machine.\n")
    env = spec.runtime_env.env_vars
    if env:
        head += f"# The job's env_vars ({', '.join(sorted(env))}) travel with the submission.\n"
    return head + yaml.safe_dump(conf, sort_keys=False, width=120)


RENDERERS = {"kuberay": kuberay, "slurm": slurm, "ray-up": ray_up}


def render(target: str, spec: JobSpec, configs: dict, job: str, overrides: list[str], file: str | None = None) -> str:
    """`target`'s text for the job `job` (as written, with `overrides`), validated as `spec` and `configs`; its
    header's commands name `file`, the file it is written to (default: the job's name)."""
    return RENDERERS[target](spec, configs, job, overrides, file)
