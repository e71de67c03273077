"""Real node processes for the tests: one node, or a 3-node cluster on
127.0.0.1 (the binary from DISTCACHE_NODE_BIN, else the cargo target dir)."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import distcache  # noqa: E402


def node_bin():
    if os.environ.get("DISTCACHE_NODE_BIN"):
        return os.environ["DISTCACHE_NODE_BIN"]
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(root, "target"))
    return os.path.join(target, "debug", "distcache-node")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, n, extra=(), per_node=None):
        self.dir = tempfile.mkdtemp(prefix="dc-py-")
        self.members = [(f"n{i}", f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}") for i in range(n)]
        spec = ",".join(f"{m}={g}/{p}" for m, g, p in self.members)
        self.procs = []
        for i, (name, grpc_addr, _) in enumerate(self.members):
            args = [node_bin(), "--listen", grpc_addr, "--name", name, "--log", "warn",
                    "--failure-timeout-ms", "1500", "--heartbeat-interval-ms", "100", *extra,
                    *(per_node[i] if per_node else [])]
            if n > 1:
                args += ["--members", spec, "--peer-insecure"]
            log = open(os.path.join(self.dir, f"{name}.log"), "w")
            self.procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log))
        self.endpoints = [g for _, g, _ in self.members]
        self.wait_safe()

    def wait_safe(self, timeout=30):
        """Until every member says the cluster is safe: a table, a quorum,
        and every partition's backups in its committed in-sync set."""
        deadline = time.time() + timeout
        while True:
            infos = []
            for e in self.endpoints:
                try:
                    with distcache.DistributedCache([e], max_retries=0, timeout=2) as c:
                        infos.append(c.cluster_info())
                except distcache.DistributedCacheError:
                    infos.append(None)
            alive = [i for i, p in zip(infos, self.procs) if p.poll() is None]
            if alive and all(i is not None and i["safe"] and i["quorum"] for i in alive):
                return
            assert time.time() < deadline, "cluster did not become safe"
            time.sleep(0.2)

    def kill(self, i):
        self.procs[i].send_signal(signal.SIGKILL)
        self.procs[i].wait()

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def node():
    c = Cluster(1)
    yield c
    c.stop()


@pytest.fixture()
def cluster3():
    c = Cluster(3)
    yield c
    c.stop()
