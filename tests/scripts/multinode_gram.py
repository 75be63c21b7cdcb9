"""Run a Gram job on a ray.cluster_utils.Cluster (head + 2 worker nodes on 127.0.0.1).

Usage: python multinode_gram.py STORE OUT.json — prints where each tile ran into OUT.json.
Run as its own process: a driver can join only one Ray, and the tests already hold one.
"""

import json
import os
import secrets
import sys

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Token authentication stays on; ray.cluster_utils does not make a token itself.
os.environ["RAY_AUTH_MODE"] = "token"
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))

import numpy as np
import ray
from ray.cluster_utils import Cluster

from ntk_scale import FullyConnected, stages
from ntk_scale.options import GramOptions, RunOptions
from ntk_scale.store import GramStore


def main(store: str, out: str) -> None:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False},
    )
    workers = [cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1") for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        x = np.random.default_rng(0).normal(size=(600, 12))
        spec = FullyConnected(depth=3, activation="relu", W_std=1.4, b_std=0.1)
        report = stages.gram(
            x,
            spec,
            store,
            GramOptions(dtype="float64", tile=100),
            RunOptions(workers=2, progress=False, wait_seconds=1.0),
        )
        full = GramStore.open(store).to_dask().compute()
        err = float(np.max(np.abs(full - spec.kernel(x, dtype="float64"))))
        nodes = sorted({w.node_id for w in workers})
        result = {
            "tile_nodes": {f"{r['i']}.{r['j']}": r["node"] for r in report.records},
            "worker_nodes": nodes,
            "head_node": cluster.head_node.node_id,
            "computed": report.computed,
            "max_abs_err": err,
        }
        with open(out, "w") as f:
            json.dump(result, f)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
