"""Job plans (paths placed under storage, pipeline stages wired) and the real-cluster renderers; no Ray started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from importlib.metadata import version

import pytest
import yaml
from conftest import REPO

from cluster.jobs import load_job, resolve
from data_prep.configfile import ConfigError

JOBS = "configs/jobs"


def _plan(job, cwd, environ=None):
    spec, configs = load_job(job)
    return spec, resolve(spec, configs, job, cwd=cwd, environ=environ or {})


def test_a_pipeline_plan_puts_outputs_under_storage_and_wires_its_stages(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    (tmp_path / "task.yaml").write_text("task: {train: t.jsonl}\noutput: ft\n")
    job = tmp_path / "job.yaml"
    job.write_text("kind: pipeline\nname: wired\nstages:\n  data_prep: {config: configs/data_prep/quickstart.yaml}\n"
                   "  pretrain: {config: configs/pretrain/quickstart.yaml, overrides: {data.dataset: elsewhere}}\n"
                   "  registry: {name: qb, alias: champion}\n  finetune: {config: task.yaml}\nstorage: st\n")
    _, plan = _plan(job, tmp_path)
    assert [s["kind"] for s in plan["stages"]] == ["data_prep", "pretrain", "register", "finetune"]
    dp, pt, reg, ft = (s.get("config", s) for s in plan["stages"])
    storage = tmp_path / "st"
    assert plan["storage"] == str(storage) and plan["name"] == "wired"
    assert dp["output"] == str(storage / "data/quickstart")
    assert dp["inputs"] == [str(tmp_path / "corpus/demo")]  # nothing under storage yet: the submitting directory
    assert pt["data"]["dataset"] == dp["output"]  # the dataset the pipeline builds, whatever the config said
    assert pt["checkpoint"]["dir"] == str(storage / "checkpoints/quickstart")
    assert reg == {"kind": "register", "name": "qb", "alias": "champion", "pooling": "cls"}
    assert ft["model"] == "models:/qb@champion" and ft["output"] == str(storage / "ft")
    assert ft["task"]["train"] == str(tmp_path / "t.jsonl")
    # MLflow: the submitting directory's store unless MLFLOW_TRACKING_URI (the job's env first) says otherwise
    assert plan["mlflow_uri"] == pt["mlflow"]["tracking_uri"] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    _, plan = _plan(job, tmp_path, {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"})
    assert plan["stages"][1]["config"]["mlflow"]["tracking_uri"] == "http://127.0.0.1:5000"


def test_relative_inputs_are_found_under_storage_first(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    (tmp_path / "st" / "data" / "quickstart").mkdir(parents=True)  # an earlier data-prep job's output
    job = tmp_path / "job.yaml"
    job.write_text("kind: pretrain\nconfig: configs/pretrain/quickstart.yaml\nstorage: st\n")
    _, plan = _plan(job, tmp_path)
    assert plan["stages"][0]["config"]["data"]["dataset"] == str(tmp_path / "st/data/quickstart")
    assert plan["name"] == "job"


def test_object_store_storage_puts_outputs_under_its_url_and_renders_without_a_volume(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: the bucket cannot be checked
    job = tmp_path / "job.yaml"
    job.write_text("kind: pipeline\nname: obj\nstorage: s3://b/x/\nstages:\n"
                   "  data_prep: {config: configs/data_prep/quickstart.yaml}\n"
                   "  pretrain: {config: configs/pretrain/quickstart.yaml}\n")
    _, plan = _plan(job, tmp_path)
    dp, pt = (s["config"] for s in plan["stages"])
    assert plan["storage"] == "s3://b/x"
    assert dp["output"] == pt["data"]["dataset"] == "s3://b/x/data/quickstart"
    assert pt["checkpoint"]["dir"] == "s3://b/x/checkpoints/quickstart"
    assert dp["inputs"] == ["s3://b/x/corpus/demo"]  # unreadable from here: the job's nodes will read it there
    out = subprocess.run([sys.executable, "-m", "cluster", "render", str(job), "--target", "kuberay"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "set runtime_env.env_vars.MLFLOW_TRACKING_URI" in out.stderr
    job.write_text(job.read_text() + "runtime_env: {env_vars: {MLFLOW_TRACKING_URI: 'http://mlflow:5000'}}\n")
    manifest = yaml.safe_load(_render(job, "kuberay"))
    head = manifest["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert head["volumes"] == [] and head["containers"][0]["volumeMounts"] == []
    env = yaml.safe_load(manifest["spec"]["runtimeEnvYAML"])["env_vars"]
    assert json.loads(env["BERTFORGE_JOB_PLAN"])["storage"] == "s3://b/x"


def _render(job, target, *extra, cwd=REPO):
    out = subprocess.run([sys.executable, "-m", "cluster", "render", str(job), "--target", target, *extra],
                         cwd=cwd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_kuberay_rayjob_carries_the_resources_and_the_resolved_plan():
    text = _render(f"{JOBS}/pretrain_bert_base_2x8gpu.yaml", "kuberay")
    assert "sqlite's locks" not in text  # (its MLflow is a tracking server)
    manifest = yaml.safe_load(text)
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    assert manifest["metadata"]["name"] == "bert-base-16gpu"
    spec = manifest["spec"]
    assert spec["entrypoint"] == "python -m cluster run"
    group = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2  # 16 workers, 8 per node
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    # Ray is told the workers' 8 x 48 GiB and a 4 GiB object store; the pod holds both and Ray's own processes
    assert limits == {"cpu": "64", "memory": "396Gi", "nvidia.com/gpu": 8}
    assert group["rayStartParams"] == {"memory": str(384 * 2**30), "object-store-memory": str(4 * 2**30)}
    # token auth through the operator (KubeRay 1.5.1+), which also hands the token to the job's submitter
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"} and cluster["rayVersion"] == version("ray")
    assert "env" not in group["template"]["spec"]["containers"][0]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"] == {"num-cpus": "0"}  # the driver only: workers train
    assert head["template"]["spec"]["containers"][0]["resources"]["limits"] == {"cpu": "2", "memory": "8Gi"}
    runtime = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow.internal:5000"
    assert runtime["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] == "300"  # a stop leaves the workers time to checkpoint
    plan = json.loads(runtime["env_vars"]["BERTFORGE_JOB_PLAN"])
    assert plan["stages"][0]["config"]["checkpoint"]["dir"] == "/shared/bertforge/checkpoints/bert_base"
    # the metadata `python -m cluster status/list NAME` and the next submission find a job by
    assert spec["metadata"]["bertforge_name"] == "bert-base-16gpu" and spec["metadata"]["bertforge_kind"] == "pretrain"
    from cluster.client import submission_metadata

    assert spec["metadata"] == submission_metadata(plan)
    assert plan["spec"]["resources"]["num_workers"] == 16 and plan["spec"]["max_failures"] == 3


def test_kuberay_head_of_a_data_prep_job_has_the_cpus_it_offers():
    """Data prep runs its tasks on the head too: its pod asks for the CPUs Ray is told it has, plus the driver's."""
    manifest = yaml.safe_load(_render(f"{JOBS}/data_prep_quickstart.yaml", "kuberay", "resources.cpus_per_worker=8",
                                      "resources.memory_gb_per_worker=16"))
    head = manifest["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"] == {"num-cpus": "8"}
    assert head["template"]["spec"]["containers"][0]["resources"]["limits"] == {"cpu": "10", "memory": "24Gi"}


def test_kuberay_mounts_a_relative_storage_and_keeps_mlflow_on_it():
    """Every job's pods mount one volume, its storage a folder in it: a pretraining job reads the dataset a data-prep
    job wrote there. The header names what the volume must hold first; a finished job's cluster goes soon."""
    text = _render(f"{JOBS}/quickstart.yaml", "kuberay")
    manifest = yaml.safe_load(text)
    head = manifest["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert head["containers"][0]["volumeMounts"][0]["mountPath"] == "/mnt/bertforge"
    assert head["volumes"][0]["persistentVolumeClaim"]["claimName"] == "bertforge-storage"
    assert manifest["spec"]["ttlSecondsAfterFinished"] <= 300
    mount = "/mnt/bertforge/outputs/quickstart"
    assert f"holding {mount}/corpus/demo, {mount}/data/task/train.jsonl" in text
    assert "sqlite's locks are not\n# reliable on network filesystems" in text  # (no tracking server named)
    runtime = yaml.safe_load(manifest["spec"]["runtimeEnvYAML"])
    assert runtime["env_vars"]["MLFLOW_TRACKING_URI"] == f"sqlite:///{mount}/mlflow.db"
    plan = json.loads(runtime["env_vars"]["BERTFORGE_JOB_PLAN"])
    assert [s["kind"] for s in plan["stages"]] == ["data_prep", "pretrain", "register", "finetune"]
    assert plan["stages"][3]["config"]["task"]["train"] == f"{mount}/data/task/train.jsonl"  # (as the corpus is)
    assert plan["stages"][0]["config"]["output"].startswith(mount)
    plans = []
    for job in ("data_prep_quickstart", "pretrain_quickstart"):
        m = yaml.safe_load(_render(f"{JOBS}/{job}.yaml", "kuberay"))
        worker = m["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
        assert worker["volumes"][0]["persistentVolumeClaim"]["claimName"] == "bertforge-storage"
        plans.append(json.loads(yaml.safe_load(m["spec"]["runtimeEnvYAML"])["env_vars"]["BERTFORGE_JOB_PLAN"]))
    assert plans[1]["stages"][0]["config"]["data"]["dataset"] == plans[0]["stages"][0]["config"]["output"]
    # an absolute storage elsewhere: the volume's folder of that path, so two storages never share files
    mounts = []
    for storage in ("/data/run1", "/data/run2"):
        m = yaml.safe_load(_render(f"{JOBS}/pretrain_quickstart.yaml", "kuberay", f"storage={storage}"))
        mounts.append(m["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
                      ["volumeMounts"][0])
    assert mounts == [{"name": "storage", "mountPath": f"/data/run{i}", "subPath": f"data/run{i}"} for i in (1, 2)]


def test_slurm_script_is_valid_bash_and_asks_for_the_job_s_nodes(tmp_path):
    text = _render(f"{JOBS}/pretrain_bert_base_2x8gpu.yaml", "slurm", "max_failures=5")
    assert "wrote" in _render(f"{JOBS}/pretrain_bert_base_2x8gpu.yaml", "slurm", "max_failures=5", "--out",
                              str(tmp_path / "new" / "job.sbatch"))  # its folder made
    written = (tmp_path / "new" / "job.sbatch").read_text()  # its header names the file it is in
    assert f"sbatch {tmp_path / 'new' / 'job.sbatch'}\n" in written and "sbatch bert-base-16gpu.sbatch\n" in text
    assert "`kubectl apply -f bert-base-16gpu.yaml`" in _render(f"{JOBS}/pretrain_bert_base_2x8gpu.yaml", "kuberay",
                                                                "max_failures=5")
    assert written.replace(str(tmp_path / "new" / "job.sbatch"), "bert-base-16gpu.sbatch") == text
    to_dir = subprocess.run([sys.executable, "-m", "cluster", "render", f"{JOBS}/pretrain_bert_base_2x8gpu.yaml",
                             "--target", "slurm", "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert to_dir.returncode == 2 and f"--out {tmp_path} is a directory" in to_dir.stderr, to_dir.stderr
    (tmp_path / "job.sbatch").write_text(text)
    assert subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")], capture_output=True).returncode == 0
    directives = dict(line[len("#SBATCH "):].split("=", 1) for line in text.splitlines()
                      if line.startswith("#SBATCH --") and "=" in line)
    assert directives["--nodes"] == "2" and directives["--gpus-per-node"] == "8" and directives["--mem"] == "396G"
    assert int(directives["--cpus-per-task"]) >= 64 and "#SBATCH --exclusive\n" in text
    assert text.count(f"--memory={384 * 2**30} --object-store-memory={4 * 2**30}") == 2  # the head node, the other
    assert "RAY_AUTH_MODE=token" in text and "RAY_AUTH_TOKEN_PATH" in text
    assert "ray start --head" in text and '--address="$head_ip:6379"' in text
    assert ("python -m cluster submit configs/jobs/pretrain_bert_base_2x8gpu.yaml max_failures=5 "
            '--address "http://${head_ip}:8265" --wait') in text
    assert "export MLFLOW_TRACKING_URI=http://mlflow.internal:5000" in text


def test_ray_up_config_carries_the_node_resources(tmp_path):
    """The rendered file, its placeholders filled in, passes the checks `ray up` makes (Ray's own code)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    text = _render(f"{JOBS}/pretrain_quickstart.yaml", "ray-up")
    conf = yaml.safe_load(text)
    assert conf["cluster_name"] == "pretrain-quickstart" and conf["min_workers"] == conf["max_workers"] == 2
    filled = yaml.safe_load(text.replace("HEAD_IP", "10.0.0.1").replace("WORKER_IP_", "10.0.1.").replace("USER", "me"))
    prepared = prepare_config(filled)
    validate_config(prepared)
    (node_type,) = prepared["available_node_types"].values()
    assert node_type["min_workers"] == node_type["max_workers"] == 2
    start = conf["worker_start_ray_commands"][1]
    assert "--num-cpus=1 " in start and "--resources" not in start  # (ray start refuses CPU in --resources)
    assert all("RAY_AUTH_MODE=token" in c for c in conf["head_start_ray_commands"][1:] +
               conf["worker_start_ray_commands"][1:])
    assert conf["file_mounts"]["~/.ray/auth_token"] == ".bertforge/auth_token"
    assert {".venv", ".git", ".bertforge"} <= set(conf["rsync_exclude"])  # (the nodes install the project themselves)
    for cmd in conf["setup_commands"] + conf["head_start_ray_commands"] + conf["worker_start_ray_commands"]:
        assert subprocess.run(["bash", "-n", "-c", cmd], capture_output=True).returncode == 0, cmd
    # submitted on the head, from the synced project: the job file's path is the project's, however it was given
    assert "ray exec pretrain-quickstart.yaml 'cd ~/bertforge && RAY_AUTH_MODE=token python -m cluster submit " \
        "configs/jobs/pretrain_quickstart.yaml --address" in _render(str(REPO / JOBS / "pretrain_quickstart.yaml"),
                                                                     "ray-up")
    outside = tmp_path / "job.yaml"
    outside.write_text(f"kind: pretrain\nconfig: {REPO}/configs/pretrain/quickstart.yaml\n")
    out = subprocess.run([sys.executable, "-m", "cluster", "render", str(outside), "--target", "ray-up"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "the job file must be under the working directory" in out.stderr, out.stderr


def test_render_validates_the_job_first():
    out = subprocess.run([sys.executable, "-m", "cluster", "render", "configs/jobs/quickstart.yaml", "--target",
                          "slurm", "resources.num_wrkers=2"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "num_wrkers" in out.stderr and "num_workers" in out.stderr and not out.stdout


def test_client_commands_explain_a_missing_or_unreachable_cluster(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    none = subprocess.run([sys.executable, "-m", "cluster", "list"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**env, "PYTHONPATH": str(REPO)})
    assert none.returncode == 1 and "no cluster address" in none.stderr and "cluster up" in none.stderr
    gone = subprocess.run([sys.executable, "-m", "cluster", "status", "x", "--address", "127.0.0.1:1"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env={**env, "PYTHONPATH": str(REPO)})
    assert gone.returncode == 1 and "cannot reach a Ray cluster at http://127.0.0.1:1" in gone.stderr
    assert "Traceback" not in gone.stderr + none.stderr


def test_node_labels_reach_every_renderer(tmp_path):
    job = tmp_path / "labelled.yaml"
    job.write_text(f"kind: pretrain\nconfig: {REPO}/configs/pretrain/quickstart.yaml\n"
                   "resources: {num_workers: 2, node_labels: {pool: a100}}\n")
    manifest = yaml.safe_load(_render(str(job), "kuberay"))
    group = manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert group["labels"] == {"pool": "a100"} and group["rayStartParams"] == {}  # (KubeRay refuses labels there)
    assert "--labels=pool=a100" in _render(str(job), "slurm")
    conf = yaml.safe_load(_render(str(job), "ray-up", cwd=tmp_path))  # (from where the job is: see ray-up's test)
    assert "--labels=pool=a100" in conf["worker_start_ray_commands"][1]


def test_a_rendered_file_holding_env_values_is_readable_by_its_owner_only(tmp_path):
    """runtime_env.env_vars' values are written into the file (credentials, often): it is made private; runtime_env.pip
    is left to Ray, which installs it on every node (the script installs nothing into whatever pip it finds)."""
    job = tmp_path / "secret.yaml"
    job.write_text(f"kind: pretrain\nconfig: {REPO}/configs/pretrain/quickstart.yaml\n"
                   "runtime_env: {env_vars: {AWS_SECRET_ACCESS_KEY: abc}, pip: [example-package]}\n")
    said = _render(str(job), "slurm", "--out", str(tmp_path / "job.sbatch"))
    assert "readable by you only" in said and (tmp_path / "job.sbatch").stat().st_mode & 0o777 == 0o600
    text = (tmp_path / "job.sbatch").read_text()
    assert "export AWS_SECRET_ACCESS_KEY=abc" in text and "pip install" not in text
    plain = _render(f"{JOBS}/pretrain_quickstart.yaml", "slurm", "--out", str(tmp_path / "plain.sbatch"))
    assert "readable by you only" not in plain


def test_names_env_vars_and_fractional_resources_that_a_cluster_would_refuse(tmp_path):
    """A job name KubeRay refuses (a file's name with a dot, a leading digit) and an environment variable name bash
    refuses are caught by validation; workers of half a GPU render a whole GPU per node, not zero."""
    spec = (REPO / JOBS / "pretrain_quickstart.yaml").read_text()
    (tmp_path / "My.Job_v2.yaml").write_text("\n".join(ln for ln in spec.splitlines() if not ln.startswith("name:")))
    with pytest.raises(ConfigError, match=r"My.Job_v2.yaml: the job takes its file's name, 'my.job-v2', which is "
                                          r"not a job name .*; set name: in the job spec"):
        _plan(tmp_path / "My.Job_v2.yaml", tmp_path)
    for override, message in (("name=2nodes", "name '2nodes': use lowercase letters, digits and '-', starting "
                                               "with a letter"),
                              ('runtime_env.env_vars={"MY-VAR": "x"}', "'MY-VAR' is not an environment variable")):
        out = subprocess.run([sys.executable, "-m", "cluster", "validate", f"{JOBS}/pretrain_quickstart.yaml",
                              override], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and message in out.stderr, out.stderr
    job = str(REPO / JOBS / "pretrain_quickstart.yaml")
    elsewhere = subprocess.run([sys.executable, "-m", "cluster", "validate", job], cwd=tmp_path, capture_output=True,
                               text=True, timeout=120,
                               env={**os.environ, "PYTHONPATH": str(REPO)})  # (its config: relative to the repository)
    assert elsewhere.returncode == 2 and "'configs/pretrain/quickstart.yaml' is neither under the working " \
        f"directory ({tmp_path}) nor beside the job file ({REPO / JOBS})" in elsewhere.stderr, elsewhere.stderr
    half = tmp_path / "finetune.yaml"  # (a fine-tune: pretraining takes whole GPUs, one per process)
    half.write_text("kind: finetune\nconfig: configs/finetune/classify.yaml\n"
                    "resources: {use_gpu: true, gpus_per_worker: 0.5, cpus_per_worker: 0.5}\n")
    text = _render(str(half), "slurm")
    assert "#SBATCH --gpus-per-node=1" in text and "--num-gpus=1" in text and "--num-cpus=1" in text, text
    # memory in fractions of a GiB: a node offers exactly what its workers ask Ray for, in whole bytes
    import math

    spec, _ = load_job(REPO / JOBS / "pretrain_quickstart.yaml", ["resources.memory_gb_per_worker=12.3",
                                                                  "resources.workers_per_node=2"])
    assert spec.resources.memory_bytes == math.ceil(12.3 * 2**30)
    text = _render(f"{JOBS}/pretrain_quickstart.yaml", "slurm", "resources.memory_gb_per_worker=12.3",
                   "resources.workers_per_node=2")
    assert f" --memory={2 * spec.resources.memory_bytes} " in text and "#SBATCH --mem=37G\n" in text, text
    manifest = yaml.safe_load(_render(str(half), "kuberay"))
    assert '"nvidia.com/gpu": 1' in json.dumps(manifest), manifest


STUBS = {  # Slurm's and the project's commands as the script calls them, logging what they were asked
    "scontrol": 'echo node1; echo node2\n',
    "srun": '''case "$*" in
  *"hostname --ip-address"*) echo "$HOST_ADDRESSES" ;;
  *"ray start"*) echo "srun cpus=$SRUN_CPUS_PER_TASK $*" >> "$LOG"; echo $$ >> "$LOG.pids"
                 [ -n "$NODES_DIE" ] || exec /bin/sleep 60 ;;
esac
''',
    "python": '''case "$1" in
  -) cat > /dev/null  # the wait for the nodes: until both have started (then all joined, or never)
     for _ in $(/usr/bin/seq 100); do [ "$(grep -c "ray start" "$LOG")" -ge 2 ] && break; /bin/sleep 0.05; done
     [ -z "$NEVER_JOIN" ] ;;
  -m) if [ "$3" = stop ]; then  # (the real one returns once the job has ended)
        echo "stop $*" >> "$LOG"; touch "$LOG.stopped"; /bin/sleep 0.5; exit 0
      fi
      echo "submit $* token=$(test -s "$RAY_AUTH_TOKEN_PATH" && echo yes)" >> "$LOG"
      if [ -n "$SUBMIT_WAITS" ]; then  # (a job that runs until it is stopped)
        for _ in $(/usr/bin/seq 400); do [ -e "$LOG.stopped" ] && break; /bin/sleep 0.05; done
      fi
      exit 3 ;;
  *) exec "$REAL_PYTHON" "$@" ;;
esac
''',
    "sleep": "",
    "seq": 'echo 1; echo 2\n',  # (the wait for the nodes tries twice, not 120 times)
}


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("nodes_die", [False, True])
def test_the_slurm_script_runs_the_job_and_ends_with_its_status(tmp_path, nodes_die):
    """The script itself, run by bash with Slurm's commands stubbed: srun steps get the allocation's CPUs, the head
    is the first node's IPv4 address, the job's exit status is the script's, and on the way out the Ray nodes are
    stopped and the token removed (also when the nodes had died already)."""
    text = _render(f"{JOBS}/pretrain_bert_base_2x8gpu.yaml", "slurm")
    (tmp_path / "job.sbatch").write_text(text)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STUBS.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(log), "REAL_PYTHON": sys.executable,
           "SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_CPUS_PER_TASK": "65", "SLURM_JOB_ID": "77",
           "SLURM_JOB_NODELIST": "node[1-2]", "HOST_ADDRESSES": "fe80::1 127.0.1.1 10.1.2.3 192.168.0.9",
           "NODES_DIE": "1" if nodes_die else ""}
    run = subprocess.run(["bash", "job.sbatch"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 3, run.stderr  # the job's own status
    said = sorted(log.read_text().splitlines())  # (the nodes start in the background: in any order)
    assert len(said) == 3 and all(line.startswith("srun cpus=65 ") for line in said[:2]), said
    assert "-w node1 --export=ALL ray start --head --block --node-ip-address=10.1.2.3 " in said[0], said[0]
    assert "-w node2 --export=ALL ray start --block --address=10.1.2.3:6379 " in said[1], said[1]
    assert said[2] == ("submit -m cluster submit configs/jobs/pretrain_bert_base_2x8gpu.yaml --address "
                       "http://10.1.2.3:8265 --wait token=yes"), said[2]
    assert not (tmp_path / ".bertforge" / "slurm-77.token").exists()
    nodes = [int(pid) for pid in (tmp_path / "log.pids").read_text().split()]
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in nodes) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in nodes), "the Ray nodes' steps outlived the script"
    no_ipv4 = subprocess.run(["bash", "job.sbatch"], cwd=tmp_path, env={**env, "HOST_ADDRESSES": "fe80::1"},
                             capture_output=True, text=True, timeout=60)
    assert no_ipv4.returncode == 1 and "node1 has no IPv4 address" in no_ipv4.stderr, no_ipv4.stderr
    assert not (tmp_path / ".bertforge" / "slurm-77.token").exists()
    log.unlink()
    missing = subprocess.run(["bash", "job.sbatch"], cwd=tmp_path, env={**env, "NEVER_JOIN": "1"},
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "not all 2 node(s) joined the Ray head at 10.1.2.3" in missing.stderr
    assert "submit" not in log.read_text() and not (tmp_path / ".bertforge" / "slurm-77.token").exists()
    # USR1 (Slurm's --signal before the time limit, or scancel --batch --signal=USR1): the job is stopped through
    # the Jobs API, as `python -m cluster stop` does, and the script ends with its status once it has ended
    log.unlink()
    script = subprocess.Popen(["bash", "job.sbatch"], cwd=tmp_path, env={**env, "SUBMIT_WAITS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while "submit" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1)  # (its trap is set right after the submission starts)
    script.send_signal(signal.SIGUSR1)
    _, err = script.communicate(timeout=60)
    assert script.returncode == 3 and "signalled: stopping job bert-base-16gpu" in err, err
    assert "stop -m cluster stop bert-base-16gpu --address http://10.1.2.3:8265" in log.read_text()
    assert not (tmp_path / ".bertforge" / "slurm-77.token").exists()
