"""The GPU code paths on fake GPUs: a local Ray told it has 2 GPUs, JAX on the CPU.

Runs gram, a distributed and a matrix-free solve and predict through the stage API and prints,
as one JSON line, what every worker reported after each stage: pid, CUDA_VISIBLE_DEVICES, the
memory and precision flags, and the roles it held. Usage: python gpu_pool.py DIR
"""

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"  # the "GPUs" are Ray resources only
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import numpy as np
import ray

from ntk_scale import FullyConnected, stages
from ntk_scale.options import GramOptions, RunOptions, SolveOptions
from ntk_scale.pool import pool_for

if __name__ == "__main__":
    out = sys.argv[1]
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    run = RunOptions(progress=False, wait_seconds=0.5)
    spec = FullyConnected(depth=2, W_std=1.4, b_std=0.1)
    x = np.random.default_rng(0).normal(size=(600, 5))
    y = np.sin(x[:, 0])
    store = os.path.join(out, "gram.zarr")
    seen = {}

    def record(stage):
        seen[stage] = [
            {"pid": s.pid, "env": s.info["env"], "jax": s.info["jax"], "roles": s.info["roles"]}
            for s in pool_for(run).slots
        ]

    stages.gram(x, spec, store, GramOptions(tile=128), run)
    record("gram")
    for operator in ("distributed", "matrixfree"):
        opts = SolveOptions(ridge=1e-2, rank=50, tol=1e-8, operator=operator)
        result = stages.solve(store, y, opts, run, model_dir=os.path.join(out, operator))
        record(operator)
    pred = stages.predict(os.path.join(out, "distributed"), x, run)  # 5 row blocks: both
    record("predict")
    print(json.dumps({"seen": seen, "resources": ray.cluster_resources(), "pred": pred.tolist()}))
