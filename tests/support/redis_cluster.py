"""A throw-away Redis Cluster of three primaries on free ports, as real processes (stopped by pid)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import redis

from tests.support.processes import ManagedProcess, free_port, wait_until


class LocalRedisCluster:
    """Three `redis-server --cluster-enabled yes` processes joined by `redis-cli --cluster create`.

    Each node gets a free client port and a free cluster-bus port (`--cluster-port`, Redis 7+),
    so nothing depends on port + 10000 being free. No persistence: files go to a temp dir."""

    def __init__(self, nodes: int = 3):
        self.dir = Path(tempfile.mkdtemp(prefix="conductor-redis-cluster-"))
        self.ports = [free_port() for _ in range(nodes)]
        self.processes: list[ManagedProcess] = []

    @property
    def url(self) -> str:
        """A seed node: the client discovers the others from it (db 0, the only one a cluster has)."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self, timeout: float = 20.0) -> LocalRedisCluster:
        server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if server is None or cli is None:
            raise RuntimeError("a Redis Cluster needs redis-server and redis-cli (Debian: redis-server, redis-tools)")
        for port in self.ports:
            args = [
                server,
                "--port",
                str(port),
                "--cluster-port",
                str(free_port()),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                f"nodes-{port}.conf",
                "--cluster-node-timeout",
                "2000",
                "--dir",
                str(self.dir),
                "--save",
                "",
                "--appendonly",
                "no",
            ]
            self.processes.append(ManagedProcess(f"redis-cluster-{port}", args, {}, self.dir).start())
        for port in self.ports:
            wait_until(lambda port=port: redis.Redis(port=port).ping(), timeout, what=f"redis node :{port}")
        subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{port}" for port in self.ports)]
            + ["--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=timeout,
        )
        wait_until(self.ready, timeout, what="cluster_state:ok on every node")
        return self

    def ready(self) -> bool:
        """Every node says cluster_state:ok and knows all the nodes."""
        for port in self.ports:
            info = redis.Redis(port=port).cluster("info")
            if info.get("cluster_state") != "ok" or int(info.get("cluster_known_nodes", 0)) != len(self.ports):
                return False
        return True

    def node(self, index: int) -> redis.Redis:
        """A plain (non-cluster) client of one node: what a client unaware of the cluster sees."""
        return redis.Redis(port=self.ports[index])

    def logs(self) -> str:
        return "\n".join(f"--- {process.name}\n{process.log_text()[-2000:]}" for process in self.processes)

    def stop(self) -> None:
        for process in self.processes:
            process.stop(timeout=5)
        shutil.rmtree(self.dir, ignore_errors=True)
