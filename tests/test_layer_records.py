"""Every stax layer is one record (ntk_scale/kernels/layers.py) that owns its rules.

Checks: each constructor stax exports has exactly one record with the fields its kind needs;
each record's JSON round-trips; and a layer type added at test time by one record alone (a
linear ``Scale(c)`` and the identity activation, neither touching network.py or shapes.py)
computes the NNGP and NTK of a dense network that a float64 numpy oracle gives independently.
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from ntk_scale.kernels import layers, stax
from ntk_scale.kernels.shapes import analyse, pair_flops

#: One example of every layer stax exports, with non-default arguments where it has any.
EXAMPLES = {
    "serial": stax.serial(stax.Dense(3), stax.Relu()),
    "parallel": stax.parallel(stax.Identity(), stax.Dense(2)),
    "FanOut": stax.FanOut(3),
    "FanInSum": stax.FanInSum(),
    "Dense": stax.Dense(4, W_std=1.5, b_std=0.2),
    "Conv": stax.Conv(8, (3, 2), strides=(2, 1), padding="CIRCULAR", W_std=1.2, b_std=0.1),
    "AvgPool": stax.AvgPool((2, 3), strides=(1, 2), padding="SAME", normalize_edges=True),
    "GlobalAvgPool": stax.GlobalAvgPool(),
    "Flatten": stax.Flatten(),
    "Relu": stax.Relu(),
    "LeakyRelu": stax.LeakyRelu(0.1),
    "Abs": stax.Abs(),
    "ABRelu": stax.ABRelu(-0.5, 2.0),
    "Erf": stax.Erf(0.5, 2.0, 0.1),
    "Identity": stax.Identity(),
}
_LEAF_FIELDS = ("out_hw", "cross", "variance", "float32")


def test_every_constructor_has_exactly_one_complete_record():
    assert sorted(EXAMPLES) == sorted(stax.LAYERS)
    assert sorted(layers.RULES) == sorted(stax.LAYERS)
    for name in stax.LAYERS:
        rule = layers.RULES[name]
        assert rule.name == name
        assert rule.build is getattr(stax, name)
        assert rule.kind in layers.KINDS
        assert EXAMPLES[name].name == name
        for field in dataclasses.fields(rule):
            value = getattr(rule, field.name)
            if field.name in _LEAF_FIELDS and rule.kind not in ("linear", "activation"):
                assert value is None, (name, field.name)  # structural: the interpreter walks it
            else:
                assert value is not None, (name, field.name)
        assert rule.flops(EXAMPLES[name].p) >= 0


def test_each_record_json_round_trips():
    for name, layer in EXAMPLES.items():
        d = layers.RULES[name].to_dict(layer)
        assert d["layer"] == name
        back = stax.layer_from_dict(json.loads(json.dumps(d)))
        assert back == layer, name
        assert layers.RULES[name].from_dict({k: v for k, v in d.items() if k != "layer"}) == layer


def test_unknown_layer_names_the_supported_ones():
    with pytest.raises(ValueError, match="unknown stax layer 'Foo'; supported: serial"):
        stax.layer_from_dict({"layer": "Foo"})
    with pytest.raises(ValueError, match="already registered"):
        layers.register(layers.RULES["Relu"])


# -- a layer added in one place ----------------------------------------------------------------
def Scale(c: float) -> stax.Layer:
    """Test-only: the signal times c, so K' = c²K and Θ' = c²Θ (no parameters)."""
    return stax.Layer("Scale", (("c", float(c)),))


def LinearAct() -> stax.Layer:
    """Test-only: the identity activation, ṡ = 1."""
    return stax.Layer("LinearAct")


def _scale_cross(z, op, layout, ntk, r1, r2):
    return op.layer.p["c"] ** 2 * layers.materialise(z, layout), r1


SCALE = layers.leaf_rule("Scale", Scale, "linear", _scale_cross,
                         lambda v, op, rec: op.layer.p["c"] ** 2 * v)  # fmt: skip
LINEAR_ACT = layers.leaf_rule("LinearAct", LinearAct, "activation",
                              lambda d, v1, v2, layout, p: (d, jnp.ones_like(d)),
                              lambda v, p: v)  # fmt: skip


@pytest.fixture
def registered(monkeypatch):
    for rule in (SCALE, LINEAR_ACT):
        monkeypatch.setitem(layers.RULES, rule.name, rule)


def _relu_oracle(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Relu's arc-cosine map in float64: (E relu(u) relu(v), E relu'(u) relu'(v))."""
    r = np.sqrt(np.outer(np.diag(k), np.diag(k)))
    theta = np.arccos(np.clip(k / r, -1.0, 1.0))
    return r * (np.sin(theta) + (math.pi - theta) * np.cos(theta)) / (2 * math.pi), (
        math.pi - theta
    ) / (2 * math.pi)


def _oracle(x: np.ndarray, w: float, b: float, c: float) -> tuple[np.ndarray, np.ndarray]:
    """NNGP, NTK of Dense(w, b), Scale(c), Relu, LinearAct, Dense(w, b) (NTK parameterization)."""
    k = w * w * (x @ x.T) / x.shape[1] + b * b
    t = k.copy()
    k, t = c * c * k, c * c * t
    k, sdot = _relu_oracle(k)
    t = sdot * t
    k = w * w * k + b * b
    return k, w * w * t + k


def test_a_layer_added_by_one_record_matches_numpy(registered):
    w, b, c = 1.3, 0.2, 0.7
    spec = stax.serial(stax.Dense(5, w, b), Scale(c), stax.Relu(), LinearAct(), stax.Dense(1, w, b))
    x = np.random.default_rng(3).normal(size=(6, 4))
    nngp, ntk = _oracle(x, w, b, c)
    np.testing.assert_allclose(spec.kernel(x, kind="nngp", dtype="float64"), nngp, rtol=1e-10)
    np.testing.assert_allclose(spec.kernel(x, kind="ntk", dtype="float64"), ntk, rtol=1e-10)
    np.testing.assert_allclose(spec.kernel(x[:2], x[3:], kind="ntk", dtype="float64"),
                               ntk[:2, 3:], rtol=1e-10)  # fmt: skip
    np.testing.assert_allclose(spec.diag(x, kind="ntk", dtype="float64"), np.diag(ntk),
                               rtol=1e-10)  # fmt: skip
    assert stax.layer_from_dict(json.loads(spec.to_json())["network"]) == spec
    # its shape and cost rules came from the same record: dense layout, one activation each
    assert analyse(spec, (4,)).layout == "dense"
    assert pair_flops(spec, (4,)) == 4 * 2 + 2 * layers.ACTIVATION_FLOPS


def test_a_layer_added_by_one_record_runs_on_images(registered):
    """On images (diag and full layouts) Scale(c) after a Conv is, for the NNGP, the same as
    scaling the Conv's W_std and b_std by c (a closed-form identity of the kernel)."""
    x = np.random.default_rng(4).normal(size=(3, 6, 6, 2))
    for pool in ((), (stax.AvgPool((2, 2)),)):
        head = (stax.Relu(), *pool, stax.Flatten(), stax.Dense(1))
        scaled = stax.serial(stax.Conv(2, (3, 3), W_std=1.1, b_std=0.3), Scale(0.6), *head)
        direct = stax.serial(stax.Conv(2, (3, 3), W_std=0.66, b_std=0.18), *head)
        want = direct.kernel(x, kind="nngp", dtype="float64")
        np.testing.assert_allclose(scaled.kernel(x, kind="nngp", dtype="float64"), want, rtol=1e-10)


def test_the_float32_bound_comes_from_the_record_too(registered, monkeypatch):
    """A record without a float32 step gives an infinite entry bound (dtype="auto" then takes
    float64, naming why); the same layer with a step gets a finite bound from that step alone,
    and it holds: Scale(c) scales D, v and Θ by c² (one rounding), as Dense's step allows."""
    from ntk_scale.kernels import bind, precision

    layer = stax.serial(stax.Dense(5, 1.3, 0.2), Scale(0.7), stax.Relu(), stax.Dense(1))
    x = np.random.default_rng(5).normal(size=(40, 4)) + 50.0  # far from the origin
    net = bind(layer, (4,))
    diag = net.diag(x, kind="ntk", dtype="float64")
    assert precision.entry_bound(net, "ntk", float(diag.max())) == math.inf
    choice = precision.choose_dtype(net, "ntk", diag, lam=1e3 * float(diag.max()))
    assert choice.dtype == "float64" and "inf" in choice.reason
    with_step = dataclasses.replace(SCALE, float32=precision.dense_step)
    monkeypatch.setitem(layers.RULES, "Scale", with_step)
    bound = precision.entry_bound(net, "ntk", float(diag.max()))
    plain = bind(stax.serial(stax.Dense(5, 1.3, 0.2), stax.Relu(), stax.Dense(1)), (4,))
    assert bound > precision.entry_bound(plain, "ntk", float(diag.max())) > 0
    exact = net.kernel(x, kind="ntk", dtype="float64")
    err = np.abs(net.kernel(x, kind="ntk", dtype="float32").astype(np.float64) - exact).max()
    assert 0 < err <= bound
