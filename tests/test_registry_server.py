"""Registration against a real `mlflow server` on loopback, with the connection cut part way (a TCP proxy between
client and server drops everything from a chosen request on): no version ever points at missing files, and
rerunning the same command completes the registration."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest
import yaml
from conftest import free_port, pretrain_cli, pretrain_config, run_pretrain

pytestmark = pytest.mark.slow

REQUEST = re.compile(rb"(GET|POST|PUT|PATCH|DELETE) (\S+) HTTP/1\.[01]")


class CuttingProxy:
    """Forwards TCP to `upstream` until a request whose path matches `cut_at` arrives the `nth` time; from then
    on it drops that connection and refuses all others, as a server that has gone away would."""

    def __init__(self, upstream: int, cut_at: str, nth: int = 1):
        self.upstream, self.pattern, self.nth = upstream, re.compile(cut_at.encode()), nth
        self.seen, self.tripped = 0, threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            client, _ = self.sock.accept()
            if self.tripped.is_set():
                client.close()
                continue
            server = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src, dst, inspect):
        try:
            while data := src.recv(65536):
                if inspect:
                    for m in REQUEST.finditer(data):
                        if self.pattern.search(m.group(2)):
                            self.seen += 1
                            if self.seen >= self.nth:
                                self.tripped.set()
                if self.tripped.is_set():
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.close()
            except OSError:
                pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp / 'server.db'}",
         "--artifacts-destination", str(tmp / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.3)
    yield port
    for p in psutil.Process(proc.pid).children(recursive=True):
        p.kill()
    proc.kill()
    proc.wait()


def _register(tmp, port: int, *extra: str) -> subprocess.CompletedProcess:
    return pretrain_cli("register", "--checkpoint", str(tmp / "ck"), "--name", "served-bert", "--alias", "prod",
                        "--tracking-uri", f"http://127.0.0.1:{port}", *extra, cwd=tmp)


def test_a_cut_registration_leaves_nothing_broken_and_a_rerun_completes_it(tmp_path, train_dataset, server):
    from mlflow.tracking import MlflowClient

    uri = f"http://127.0.0.1:{server}"
    cfg = tmp_path / "pretrain.yaml"
    cfg.write_text(yaml.safe_dump(pretrain_config(train_dataset, tmp_path / "ck", train__max_steps=6,
                                                  mlflow__tracking_uri=uri)))
    out = run_pretrain(cfg)
    assert out.returncode == 0, out.stderr[-3000:]
    client = MlflowClient(uri, registry_uri=uri)

    def versions():
        return client.search_model_versions("name='served-bert'")

    # The server goes away half way through the upload (at the 3rd file), then just before the version is created.
    for cut_at, nth in (("mlflow-artifacts/artifacts/", 3), ("model-versions/create", 1)):
        proxy = CuttingProxy(server, cut_at, nth)
        failed = _register(tmp_path, proxy.port)
        assert proxy.tripped.is_set(), (cut_at, failed.returncode, failed.stdout[-1500:], failed.stderr[-1500:])
        assert failed.returncode == 1, failed.stderr[-2000:]
        assert "nothing points at an incomplete upload, and registering again completes it" in failed.stderr
        assert "Traceback" not in failed.stderr
        assert versions() == [], "no version exists for an unfinished registration"

    done = _register(tmp_path, server)
    assert done.returncode == 0, done.stderr[-3000:]
    (v,) = versions()
    assert str(client.get_model_version_by_alias("served-bert", "prod").version) == str(v.version)
    pulled = pretrain_cli("pull", "models:/served-bert@prod", "--out", str(tmp_path / "pulled"), "--tracking-uri", uri,
                          cwd=tmp_path)
    assert pulled.returncode == 0 and "(verified)" in pulled.stdout, pulled.stderr[-2000:]
