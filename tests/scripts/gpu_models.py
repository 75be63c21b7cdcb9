"""Hosts of one GPU model on fake GPUs: a local Ray told it has 2 GPUs on a node whose model is
A100 (``accelerator_type:A100``), JAX on the CPU. Prints one JSON line: the hosts' GPU
settings for accelerator="A100", and the error a model the node lacks (H100) gets at once.
Usage: python gpu_models.py"""

import json
import os
import time

os.environ["JAX_PLATFORMS"] = "cpu"  # the "GPUs" are Ray resources only
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import ray

from ntk_scale.errors import GPUUnavailableError
from ntk_scale.options import RunOptions
from ntk_scale.pool import pool_for

if __name__ == "__main__":
    ray.init(num_cpus=2, num_gpus=2, resources={"accelerator_type:A100": 1},
             include_dashboard=False, _node_ip_address="127.0.0.1")  # fmt: skip
    pool = pool_for(RunOptions(accelerator="A100", workers=2, gpu_wait_s=30))
    hosts = [s.info["env"]["CUDA_VISIBLE_DEVICES"] for s in pool.take(2)]
    start, error = time.monotonic(), None
    try:
        pool_for(RunOptions(accelerator="H100", gpu_wait_s=30))
    except GPUUnavailableError as err:
        error = str(err)
    took = time.monotonic() - start
    print(json.dumps({"hosts": sorted(hosts), "request": pool.request.resources,
                      "error": error, "error_s": took}))  # fmt: skip
