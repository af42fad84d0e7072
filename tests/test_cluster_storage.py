"""Object-store storage (`storage: s3://...`), against a real S3 API (moto's server on loopback, read and written
with s3fs and pyarrow as on AWS): the pipeline job with 2 training workers writes its dataset, checkpoints and
fine-tuned model to the bucket and nothing to local outputs. (Resuming from the bucket after a worker dies, on
two nodes: tests/test_cluster_jobs.py.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import BUCKET, pretrain_env, write_pipeline_job
from test_cluster_pipeline import _submit

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def job(tmp_path_factory, s3):
    env, _ = s3
    root = tmp_path_factory.mktemp("s3-pipeline")
    write_pipeline_job(root, storage=f"s3://{BUCKET}/jobs", resources={"num_workers": 2, "cpus_per_worker": 1},
                       steps=6, every=3)
    env = {**env, "BERTFORGE_STAGING": str(root / "machine-a")}
    return root, env, _submit(root, env=env)


def test_the_pipeline_keeps_every_output_in_the_bucket(job, s3):
    root, env, out = job
    _, fs = s3
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    summary = out.stdout[out.stdout.index("== job summary: small =="):]
    base = f"s3://{BUCKET}/jobs"
    assert f"dataset      {base}/data/small (id " in summary
    assert f"pretraining  {base}/checkpoints/small/step-00000006 (step 6" in summary
    assert "registered   small-bert version 1 (models:/small-bert@champion" in summary
    assert f"fine-tuned   {base}/finetuned/model (test_accuracy" in summary
    assert not (root / "out").exists() and not (root / "outputs").exists()

    ds = f"{BUCKET}/jobs/data/small"
    manifest = json.loads(fs.cat_file(f"{ds}/manifest.json"))
    shards = [s["name"] for split in manifest["splits"].values() for s in split["shards"]]
    assert shards and all(fs.exists(f"{ds}/{name}") for name in shards)
    assert not fs.exists(f"{ds}/.work")  # the staging state is not part of the dataset
    shown = subprocess.run([sys.executable, "-m", "data_prep", "inspect", f"{base}/data/small", "-n", "2"],
                           env={**pretrain_env(), **env}, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert f"dataset {base}/data/small  id {manifest['dataset_id']}" in shown.stdout
    assert shown.stdout.count("\n[") == 2 and "targets:" in shown.stdout

    ck = f"{BUCKET}/jobs/checkpoints/small"
    for step in (3, 6):  # both ranks' parts, merged by Ray Train into one checkpoint, then marked complete
        complete = json.loads(fs.cat_file(f"{ck}/step-{step:08d}/complete.json"))
        assert {"rank-00000.pt", "rank-00001.pt", "commit.json", "client.json"} <= set(complete["files"])
        assert sum("optim_states" in name for name in complete["files"]) == 2
        assert complete["world_size"] == 2
    workers = [json.loads(fs.cat_file(f"{ck}/workers/rank-{r:05d}.json")) for r in (0, 1)]
    assert {w["rank"] for w in workers} == {0, 1}
    assert fs.exists(f"{BUCKET}/jobs/finetuned/summary.json") and fs.exists(f"{BUCKET}/jobs/finetuned/model")
