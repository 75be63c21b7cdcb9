"""A driver for the killed-predict test: predictions of a model to a Zarr array, SIGKILLing its
own process after KILL_AFTER finished blocks (a real kill mid-run, at a deterministic point).

Usage: python predict_driver.py MODEL_DIR X_STAR.npy OUT.zarr KILL_AFTER (0: never)
"""

import os
import signal
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np

from ntk_scale.options import RunOptions

if __name__ == "__main__":
    model, xs, out, kill_after = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    done = []

    def on_block(i: int) -> None:
        done.append(i)
        print(f"block {i}", flush=True)
        if kill_after and len(done) >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    x = np.load(xs, mmap_mode="r")
    from ntk_scale.model import load_model
    from ntk_scale.predict import predict_from_store

    m = load_model(model)
    predict_from_store(m.store_url, m.alpha, x, RunOptions(workers=2, progress=False), on_block,
                       out=out)  # fmt: skip
    print("finished", flush=True)
