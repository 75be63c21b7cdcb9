"""`ntk-scale gram` on a Ray that has no CPU for a worker: must exit 2 naming what each worker
asks for and what the cluster has. Usage: python no_room.py X.npy STORE"""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import ray

from ntk_scale.cli import main

if __name__ == "__main__":
    ray.init(num_cpus=0, include_dashboard=False, _node_ip_address="127.0.0.1")
    code = main(["gram", "--x", sys.argv[1], "--store", sys.argv[2], "--no-progress"])
    print(f"exit {code}", flush=True)
    sys.exit(code)
