"""What a Gram and its solve cost in the cloud: hours and dollars per GPU node type, for each
solver operator, and the cheapest pool that meets a deadline. Pure: plan numbers and the
figures of ``ntk_scale/data/accelerators.toml`` in, frozen records out (no Ray, no I/O beyond
reading that file).

The model, per node type with ``nodes`` nodes of ``g`` GPUs each (G = nodes x g):

    gram     max(FLOPs / (G x rate), bytes / (nodes x node_rate))     rate: one GPU's FLOP/s
    stored   iterations x bytes / head_rate                            the head reads it all
    distrib. iterations x bytes x (2 - 1/G) / (nodes x node_rate)      each actor reads the tiles
             touching its row panels (an off-diagonal tile serves two panels); read once when
             every actor's panels (N^2 x itemsize / G) fit its memory budget
    matfree  iterations x N^2 x FLOPs per entry / (G x rate)          no Gram, no bucket

``rate`` is a tile measured on such a GPU when there is one, else the datasheet's peak x
gpu_efficiency; ``node_rate`` and ``head_rate`` are a node's published network rate (capped by
what one node moves to or from the bucket) x network_efficiency. Dollars: GPU nodes for the
hours they run (during a stored solve they idle and the autoscaler removes them), the head for
the whole job, and the bucket's standard storage for keep_months while the store is kept.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from importlib import resources
from typing import Any

from ntk_scale.options import SolveOptions, default

OPERATORS = ("stored", "distributed", "matrixfree")
#: "24h", "2d", "90m", "1.5h" (a bare number is hours).
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([hdm]?)\s*$")
_HOURS_PER = {"": 1.0, "h": 1.0, "d": 24.0, "m": 1 / 60}
_HOURS_PER_MONTH = 730.0


@dataclasses.dataclass(frozen=True)
class Accelerator:
    name: str
    fp32_tflops: float
    fp64_tflops: float
    memory_gb: float
    memory_gbs: float
    source: str

    def peak_flops(self, dtype: str) -> float:
        """Peak FLOP/s in the tiles' dtype (float32 or float64)."""
        return 1e12 * (self.fp32_tflops if dtype == "float32" else self.fp64_tflops)


@dataclasses.dataclass(frozen=True)
class Node:
    """A GPU worker node type of deploy/ (max_nodes: its worker group's max_workers)."""

    name: str
    cloud: str
    region: str
    accelerator: str
    gpus: int
    usd_per_hour: float
    network_gbps: float
    max_nodes: int
    source: str


@dataclasses.dataclass(frozen=True)
class Head:
    name: str
    usd_per_hour: float
    network_gbps: float
    source: str


@dataclasses.dataclass(frozen=True)
class Bucket:
    service: str
    usd_per_gb_month: float
    node_gbps: float
    source: str


@dataclasses.dataclass(frozen=True)
class Catalog:
    """The data file: GPU models by name, node types, and a head and a bucket per cloud."""

    accelerators: dict[str, Accelerator]
    nodes: tuple[Node, ...]
    heads: dict[str, Head]
    buckets: dict[str, Bucket]
    prices_checked: str


def load_catalog(path: str | None = None) -> Catalog:
    """The catalog in ``path`` (default: the package's data/accelerators.toml)."""
    if path is None:
        text = resources.files("ntk_scale").joinpath("data/accelerators.toml").read_text()
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    raw = tomllib.loads(text)
    try:
        accs = {k: Accelerator(name=k, **v) for k, v in raw["accelerator"].items()}
        nodes = tuple(Node(**v) for v in raw["node"])
        heads = {k: Head(**v) for k, v in raw["head"].items()}
        buckets = {k: Bucket(**v) for k, v in raw["bucket"].items()}
    except (KeyError, TypeError) as err:
        raise ValueError(f"accelerator catalog {path or 'data/accelerators.toml'}: {err}; "
                         "keep the keys of the packaged file") from None  # fmt: skip
    for node in nodes:
        if node.accelerator not in accs or node.cloud not in heads or node.cloud not in buckets:
            raise ValueError(
                f"node {node.name}: accelerator {node.accelerator!r} or cloud {node.cloud!r} "
                "has no [accelerator] / [head] / [bucket] entry; add one"
            )
    return Catalog(accs, nodes, heads, buckets, raw.get("meta", {}).get("prices_checked", "?"))


@dataclasses.dataclass(frozen=True)
class CloudAssumptions:
    """The assumptions of the cost table, printed with it (the ONE definition of their defaults).

    iterations: PCG iterations. gpus: GPUs of the table's pool (whole nodes: rounded up to
    nodes). gpu_efficiency: fraction of a GPU's peak FLOP/s a tile reaches (unused where a
    tile was measured on that GPU). network_efficiency: fraction of a node's published network
    rate reached to or from the bucket. network_gbps / head_gbps: a GPU node's / the head's
    rate to the bucket in Gbit/s, instead of the published figure (head: or the read rate
    measured against the store). keep_months: months the bucket keeps the store.
    memory_budget_bytes: per distributed actor (panels in memory when they fit).
    """

    iterations: int = 100
    gpus: int = 8
    gpu_efficiency: float = 0.5
    network_efficiency: float = 0.7
    network_gbps: float | None = None
    head_gbps: float | None = None
    keep_months: float = 1.0
    memory_budget_bytes: int = default(SolveOptions, "memory_budget_bytes")

    def __post_init__(self) -> None:
        for name in ("iterations", "gpus"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer, e.g. 100")
        for name in ("gpu_efficiency", "network_efficiency"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must lie in (0, 1], e.g. 0.5")
        for name in ("network_gbps", "head_gbps"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be > 0 Gbit/s, e.g. 10")
        if not self.keep_months >= 0:
            raise ValueError(f"keep_months={self.keep_months!r} must be >= 0, e.g. 1")


@dataclasses.dataclass(frozen=True)
class Workload:
    """What the cost model needs of a plan: N, the store's bytes, the Gram's FLOPs (upper
    triangle), FLOPs per kernel entry, the tiles' dtype; ``measured``: FLOP/s of one GPU, by
    GPU model, from a tile timed on it; ``head_read_bytes_per_s``: measured against the store."""

    n: int
    bytes_on_disk: int
    gram_flops: float
    flops_per_entry: float
    dtype: str
    measured: dict[str, float] = dataclasses.field(default_factory=dict)
    head_read_bytes_per_s: float | None = None

    @property
    def itemsize(self) -> int:
        return 4 if self.dtype == "float32" else 8


@dataclasses.dataclass(frozen=True)
class Estimate:
    """One (node type, pool, operator): hours (gram, solve, total) and dollars."""

    node: Node
    nodes: int
    operator: str
    gram_hours: float
    solve_hours: float
    compute_usd: float
    storage_usd: float

    @property
    def gpus(self) -> int:
        return self.nodes * self.node.gpus

    @property
    def hours(self) -> float:
        return self.gram_hours + self.solve_hours

    @property
    def usd(self) -> float:
        return self.compute_usd + self.storage_usd


def gpu_flops(work: Workload, catalog: Catalog, node: Node, a: CloudAssumptions) -> float:
    """FLOP/s of one GPU of ``node``: measured on such a GPU, else peak x gpu_efficiency."""
    if node.accelerator in work.measured:
        return work.measured[node.accelerator]
    return catalog.accelerators[node.accelerator].peak_flops(work.dtype) * a.gpu_efficiency


def node_rate(catalog: Catalog, node: Node, a: CloudAssumptions) -> float:
    """Bytes/s one GPU node moves to or from the bucket."""
    gbps = a.network_gbps or min(node.network_gbps, catalog.buckets[node.cloud].node_gbps)
    return gbps * 1e9 / 8 * (1.0 if a.network_gbps else a.network_efficiency)


def head_rate(work: Workload, catalog: Catalog, cloud: str, a: CloudAssumptions) -> float:
    """Bytes/s the head reads from the bucket: --head-gbps, else measured, else published."""
    if a.head_gbps is not None:
        return a.head_gbps * 1e9 / 8
    if work.head_read_bytes_per_s is not None:
        return work.head_read_bytes_per_s
    gbps = min(catalog.heads[cloud].network_gbps, catalog.buckets[cloud].node_gbps)
    return gbps * 1e9 / 8 * a.network_efficiency


def estimate(
    work: Workload, catalog: Catalog, node: Node, nodes: int, operator: str, a: CloudAssumptions
) -> Estimate:
    """Hours and dollars of the Gram (none for matrixfree) and ``a.iterations`` PCG iterations
    with ``operator`` on ``nodes`` nodes of type ``node``."""
    gpus, rate = nodes * node.gpus, gpu_flops(work, catalog, node, a)
    net = nodes * node_rate(catalog, node, a)
    gram_s = max(work.gram_flops / (gpus * rate), work.bytes_on_disk / net)
    if operator == "matrixfree":
        gram_s = 0.0
        solve_s = a.iterations * work.n**2 * work.flops_per_entry / (gpus * rate)
    elif operator == "stored":
        solve_s = a.iterations * work.bytes_on_disk / head_rate(work, catalog, node.cloud, a)
    elif operator == "distributed":
        reads = a.iterations
        if work.n**2 * work.itemsize / gpus <= a.memory_budget_bytes:
            reads = 1  # every actor's panels fit in memory: read once
        solve_s = reads * work.bytes_on_disk * (2 - 1 / gpus) / net
    else:
        raise ValueError(f"operator={operator!r}; use one of {OPERATORS}")
    node_hours = (gram_s + (0.0 if operator == "stored" else solve_s)) / 3600
    hours = (gram_s + solve_s) / 3600
    compute = (
        node_hours * nodes * node.usd_per_hour + hours * catalog.heads[node.cloud].usd_per_hour
    )
    storage = 0.0
    if operator != "matrixfree":
        months = max(a.keep_months, hours / _HOURS_PER_MONTH)
        storage = work.bytes_on_disk / 1e9 * catalog.buckets[node.cloud].usd_per_gb_month * months
    return Estimate(node, nodes, operator, gram_s / 3600, solve_s / 3600, compute, storage)


def cost_table(work: Workload, catalog: Catalog, a: CloudAssumptions) -> list[Estimate]:
    """Every node type x operator for a pool of ``a.gpus`` GPUs (rounded up to whole nodes)."""
    return [
        estimate(work, catalog, node, math.ceil(a.gpus / node.gpus), op, a)
        for node in catalog.nodes
        for op in OPERATORS
    ]


def recommend(
    work: Workload, catalog: Catalog, a: CloudAssumptions, deadline_hours: float
) -> tuple[Estimate | None, Estimate]:
    """(cheapest estimate finishing within the deadline, or None; the fastest estimate), over
    every node type, operator and pool of 1..max_nodes nodes. Ties go to fewer nodes."""
    options = [
        estimate(work, catalog, node, k, op, a)
        for node in catalog.nodes
        for k in range(1, node.max_nodes + 1)
        for op in OPERATORS
    ]
    fastest = min(options, key=lambda e: (e.hours, e.usd))
    feasible = [e for e in options if e.hours <= deadline_hours]
    best = min(feasible, key=lambda e: (round(e.usd, 2), e.nodes)) if feasible else None
    return best, fastest


def parse_duration(text: str) -> float:
    """Hours in "24h", "2d", "90m" or "1.5" (hours)."""
    m = _DURATION.match(str(text))
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"deadline {text!r} is not a duration; write e.g. 24h, 2d or 90m")
    return float(m.group(1)) * _HOURS_PER[m.group(2)]


# -- text ---------------------------------------------------------------------------------------
def table_lines(estimates: list[Estimate], work: Workload, catalog: Catalog) -> list[str]:
    """The cost table: one row per node type, hours and dollars of each operator."""
    head = (f"{'GPU':<5} {'node (cloud region, $/h)':<42} {'pool':>8} {'Gram h':>7} {'Gram $':>8} "
            + " ".join(f"{op + ' h':>14} {'$':>8}" for op in OPERATORS)
            + f" {'bucket $/mo':>11}")  # fmt: skip
    lines = [head, "-" * len(head)]
    by_node: dict[str, dict[str, Estimate]] = {}
    for e in estimates:
        by_node.setdefault(e.node.name, {})[e.operator] = e
    for ops in by_node.values():
        any_e = ops["stored"]
        node, gram = any_e.node, _gram_usd(any_e, catalog)
        label = f"{node.name} ({node.cloud} {node.region}, {node.usd_per_hour:g})"
        cells = " ".join(f"{_hours(ops[op].hours):>14} {_usd(ops[op].usd):>8}" for op in OPERATORS)
        month = work.bytes_on_disk / 1e9 * catalog.buckets[node.cloud].usd_per_gb_month
        pool = f"{any_e.gpus} GPUs"
        gram_cells = f"{_hours(any_e.gram_hours):>7} {_usd(gram):>8}"
        lines.append(f"{node.accelerator:<5} {label:<42} {pool:>8} {gram_cells} {cells} "
                     f"{_usd(month):>11}")  # fmt: skip
    return lines


def _gram_usd(e: Estimate, catalog: Catalog) -> float:
    head = catalog.heads[e.node.cloud].usd_per_hour
    return e.gram_hours * (e.nodes * e.node.usd_per_hour + head)


def assumption_lines(work: Workload, catalog: Catalog, a: CloudAssumptions) -> list[str]:
    """What the table assumes, each with the option that changes it."""
    clouds = sorted({n.cloud for n in catalog.nodes})
    heads = ", ".join(
        f"{c} {catalog.heads[c].name} {head_rate(work, catalog, c, a) * 8 / 1e9:.2f} Gbit/s"
        for c in clouds
    )
    measured = ", ".join(f"{k} {v / 1e12:.1f} TFLOP/s" for k, v in work.measured.items())
    return [
        f"PCG iterations: {a.iterations} (--iterations)",
        f"pool: {a.gpus} GPUs, rounded up to whole nodes (--gpus)",
        f"GPU throughput: {measured or 'none measured here'}; others: datasheet peak "
        f"{work.dtype} x {a.gpu_efficiency:g} (--gpu-efficiency)",
        f"node <-> bucket: published network rate (capped at the bucket's per-node rate) x "
        f"{a.network_efficiency:g} (--network-efficiency)"
        + (f"; here {a.network_gbps:g} Gbit/s per node (--network-gbps)" if a.network_gbps else ""),
        f"one stored iteration reads {_bytes(work.bytes_on_disk)} through the head: "
        + ", ".join(
            f"{c} {work.bytes_on_disk / head_rate(work, catalog, c, a) / 60:.1f} min"
            for c in clouds
        ),  # fmt: skip
        f"head reads (stored operator): {heads}"
        + (
            " (--head-gbps)"
            if a.head_gbps
            else " (measured against the store)"
            if work.head_read_bytes_per_s
            else " (published x efficiency; --head-gbps)"
        ),  # fmt: skip
        f"bucket: the store kept {a.keep_months:g} month(s) (--keep-months); "
        + "; ".join(
            f"{c}: {b.service} ${b.usd_per_gb_month}/GB-month"
            for c, b in sorted(catalog.buckets.items())
        ),  # fmt: skip
        f"prices: on-demand, checked {catalog.prices_checked} (ntk_scale/data/accelerators.toml)",
    ]


def recommendation_lines(
    best: Estimate | None, fastest: Estimate, deadline_hours: float
) -> list[str]:
    if best is None:
        return [f"no node type, operator and pool meets the deadline of {_hours(deadline_hours)}; "
                f"the fastest: {_describe(fastest)}"]  # fmt: skip
    return [f"cheapest within {_hours(deadline_hours)}: {_describe(best)}"]


def _describe(e: Estimate) -> str:
    return (f"{e.nodes} x {e.node.name} ({e.gpus} {e.node.accelerator}), --operator "
            f"{e.operator}: {_hours(e.hours)} (Gram {_hours(e.gram_hours)}, solve "
            f"{_hours(e.solve_hours)}), {_usd(e.usd)} (bucket {_usd(e.storage_usd)})")  # fmt: skip


def _hours(h: float) -> str:
    if h == 0:
        return "-"
    return f"{h * 60:.0f} min" if h < 1 else f"{h:.1f} h"


def _usd(x: float) -> str:
    return f"${x:,.0f}" if x >= 10 else f"${x:,.2f}"


def workload(plan: Any, measured: dict[str, float] | None = None,
             head_read_bytes_per_s: float | None = None) -> Workload:  # fmt: skip
    """The Workload of a :class:`ntk_scale.sizing.GramPlan`."""
    return Workload(
        n=plan.n,
        bytes_on_disk=plan.bytes_on_disk,
        gram_flops=plan.flops,
        flops_per_entry=plan.flops / plan.entries,
        dtype=plan.dtype,
        measured=dict(measured or {}),
        head_read_bytes_per_s=head_read_bytes_per_s,
    )


def report_lines(
    work: Workload, catalog: Catalog, a: CloudAssumptions, deadline_hours: float | None = None
) -> list[str]:
    """What `ntk-scale plan` prints for the cloud: the table, its assumptions and, with a
    deadline, the cheapest node type, operator and pool that meet it."""
    lines = ["", f"cloud cost: Gram + {a.iterations} PCG iterations, each operator", ""]
    lines += table_lines(cost_table(work, catalog, a), work, catalog)
    lines += ["", "assumptions:", *(f"  {line}" for line in assumption_lines(work, catalog, a))]
    if deadline_hours is not None:
        lines += ["", *recommendation_lines(*recommend(work, catalog, a, deadline_hours),
                                            deadline_hours)]  # fmt: skip
    return lines


def _bytes(n: float) -> str:
    """n bytes -> "20.4 GB", "2.0 TB"."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"
