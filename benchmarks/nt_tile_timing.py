"""Time Neural Tangents' ``kernel_fn`` on one NTK tile (helper for kernel_throughput.py).

Runs under the Neural Tangents oracle environment (neural-tangents 0.6.5 on jax 0.5.3), never the
project's venv:

    ../shared/tools/nt-oracle.sh benchmarks/nt_tile_timing.py --n 4096 --d 784 --repeats 5

The network is the one ``benchmarks/kernel_throughput.py`` times with ntk_scale: depth-3 ReLU,
W_std=1.4, b_std=0.1, NTK parameterization. The same inputs are made the same way (numpy
default_rng, see ``make_inputs``). The floor, a jitted ``jnp.dot(x1, x2.T, precision=HIGHEST)``
of the same shapes and dtype, is timed in this process too, interleaved with ``kernel_fn``.

Progress goes to stderr; stdout is a single JSON line (the result) for the main script to parse.
"""

import argparse
import json
import statistics
import sys
import time

import numpy as np

DEPTH = 3
W_STD = 1.4
B_STD = 0.1


def make_inputs(n: int, d: int, dtype: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two distinct (n, d) standard-normal blocks. Keep in step with kernel_throughput.py."""
    rng = np.random.default_rng([seed, d])
    x1 = rng.standard_normal((n, d)).astype(dtype)
    x2 = rng.standard_normal((n, d)).astype(dtype)
    return x1, x2


def log(msg: str) -> None:
    print(f"[nt_tile_timing] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096, help="tile side (n x n tile)")
    ap.add_argument("--d", type=int, default=784, help="input dimension")
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats after the warm-up")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import jax

    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from neural_tangents import stax

    layers = []
    for _ in range(DEPTH):
        layers += [stax.Dense(512, W_std=W_STD, b_std=B_STD), stax.Relu()]
    _, _, kernel_fn = stax.serial(*layers, stax.Dense(1, W_std=W_STD, b_std=B_STD))
    kernel_fn = jax.jit(kernel_fn, static_argnames="get")
    floor_fn = jax.jit(lambda a, b: jnp.dot(a, b.T, precision=jax.lax.Precision.HIGHEST))

    x1, x2 = make_inputs(args.n, args.d, args.dtype, args.seed)
    fns = {
        "nt": lambda: kernel_fn(x1, x2, "ntk"),
        "floor": lambda: floor_fn(x1, x2),
    }

    compile_s = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        out = fn().block_until_ready()
        compile_s[name] = time.perf_counter() - t0
        log(f"{name}: first call (compile + run) {compile_s[name]:.2f} s")
        if name == "nt":
            assert out.shape == (args.n, args.n) and out.dtype == np.dtype(args.dtype), out.dtype
            finite = bool(np.isfinite(np.asarray(out)).all())
        del out
    for fn in fns.values():  # one untimed warm run each
        fn().block_until_ready()

    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(args.repeats):
        for name in names if r % 2 == 0 else names[::-1]:  # interleaved, alternating order
            t0 = time.perf_counter()
            fns[name]().block_until_ready()
            times[name].append(time.perf_counter() - t0)
        nt_s, floor_s = times["nt"][-1], times["floor"][-1]
        log(f"repeat {r + 1}/{args.repeats}: nt {nt_s:.3f} s, floor {floor_s:.3f} s")

    nt_s = statistics.median(times["nt"])
    floor_s = statistics.median(times["floor"])
    import neural_tangents as nt

    result = {
        "n": args.n,
        "d": args.d,
        "dtype": args.dtype,
        "repeats": args.repeats,
        "tile_s": nt_s,
        "floor_s": floor_s,
        "ratio": nt_s / floor_s,
        "entries_per_s": args.n * args.n / nt_s,
        "tile_times_s": times["nt"],
        "floor_times_s": times["floor"],
        "compile_s": compile_s,
        "finite": finite,
        "jax_version": jax.__version__,
        "neural_tangents_version": getattr(nt, "__version__", "0.6.5"),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
