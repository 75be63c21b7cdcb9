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
gpu_efficiency; ``node_rate`` and ``head_rate`` are a node's sustained baseline network rate,
capped by what one node moves to or from the bucket and by the path to it (AWS: an S3 gateway
endpoint by default, or an internet gateway's cap), x network_efficiency.

Hours: the GPU nodes' start-up, then the Gram, then the solve. Dollars, as the code runs: GPU
nodes from launch (start-up) through the Gram and, for distributed and matrixfree, the solve,
plus the autoscaler's idle timeout before it removes them; a stored solve runs in the head
(:func:`ntk_scale.pool.release_for_solve` kills the GPU hosts before it), so there they are
billed for the Gram only. The head for the whole job (on-demand), and the bucket's standard
storage for keep_months while the store is kept. Spot: the same hours at the catalog's spot
price for the GPU nodes.

Matrix-free sends every GPU node a copy of X (N x d x itemsize bytes) through Ray's object
store, which is 30% of the node's RAM by default (at most 200 GB): a route whose copy does not
fit is flagged and never recommended.
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
#: Operators whose products run in the head: the GPU nodes leave after the Gram.
HEAD_OPERATORS = ("stored",)
BUCKET_PATHS = ("endpoint", "internet")
#: Ray's default object store: this fraction of a node's memory, at most this many bytes
#: (ray._private.ray_constants DEFAULT_OBJECT_STORE_MEMORY_PROPORTION / _MAX_MEMORY_BYTES).
RAY_OBJECT_STORE_FRACTION = 0.3
RAY_OBJECT_STORE_MAX_BYTES = 200 * 10**9
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
    """A GPU worker node type of deploy/ (max_nodes: its worker group's max_workers).

    network_gbps: the sustained baseline (not the "up to" burst); memory_gb: RAM in GiB;
    spot_usd_per_hour: the catalog's spot figure (an assumption it cites)."""

    name: str
    cloud: str
    region: str
    accelerator: str
    gpus: int
    vcpus: int
    memory_gb: float
    usd_per_hour: float
    spot_usd_per_hour: float
    network_gbps: float
    max_nodes: int
    source: str
    network_source: str = ""
    spot_source: str = ""

    @property
    def object_store_bytes(self) -> float:
        """Ray's default object store on this node: 30% of its RAM, at most 200 GB."""
        ram = self.memory_gb * 2**30
        return min(RAY_OBJECT_STORE_FRACTION * ram, RAY_OBJECT_STORE_MAX_BYTES)


@dataclasses.dataclass(frozen=True)
class Head:
    name: str
    vcpus: int
    usd_per_hour: float
    network_gbps: float
    source: str


@dataclasses.dataclass(frozen=True)
class Bucket:
    """A cloud's bucket. path: the route to it `plan` assumes by default; internet_*: the cap an
    internet gateway puts on a node's traffic (below internet_min_vcpus vCPUs
    internet_cap_gbps, else the larger of it and internet_fraction of the node's rate)."""

    service: str
    usd_per_gb_month: float
    node_gbps: float
    source: str
    path: str = ""
    path_source: str = ""
    internet_cap_gbps: float | None = None
    internet_fraction: float | None = None
    internet_min_vcpus: int | None = None


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
    bucket_path: "endpoint" (an S3 gateway endpoint on AWS, Private Google Access on GCP: the
    node's full rate) or "internet" (through an internet gateway, capped). startup_minutes:
    from a GPU node's launch to its Ray worker joining (an assumption: instance start, image
    pull, Ray start). idle_minutes: how long the autoscaler keeps an idle node
    (idle_timeout_minutes = 10 in deploy/aws-gpu.yaml and gcp-gpu.yaml, idleTimeoutSeconds = 600
    in the KubeRay manifests).
    """

    iterations: int = 100
    gpus: int = 8
    gpu_efficiency: float = 0.5
    network_efficiency: float = 0.7
    network_gbps: float | None = None
    head_gbps: float | None = None
    keep_months: float = 1.0
    memory_budget_bytes: int = default(SolveOptions, "memory_budget_bytes")
    bucket_path: str = "endpoint"
    startup_minutes: float = 8.0
    idle_minutes: float = 10.0

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
        for name in ("keep_months", "startup_minutes", "idle_minutes"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 0, e.g. 1")
        if self.bucket_path not in BUCKET_PATHS:
            raise ValueError(f"bucket_path={self.bucket_path!r}; use one of {BUCKET_PATHS}")


@dataclasses.dataclass(frozen=True)
class NystromWork:
    """What the cost model needs of a Nyström plan (:class:`ntk_scale.sizing.NystromPlan`),
    K(X, C) on the normal route: one pass, the workers accumulating H = K_nmᵀK_nm (M x M).

    centers: M; entries: kernel entries (RPCholesky's pool x M, K(C, C)'s stored triangle,
    N x M); gemm_flops: H on its upper triangle (syrk) plus ``iterations`` products H·P;
    bytes_on_disk: the K(C, C) store (K(X, C) is not stored on this route)."""

    centers: int
    entries: int
    gemm_flops: float
    iterations: int
    bytes_on_disk: int


@dataclasses.dataclass(frozen=True)
class Workload:
    """What the cost model needs of a plan: N, the store's bytes, the Gram's FLOPs (upper
    triangle), FLOPs per kernel entry, the tiles' dtype; ``measured``: FLOP/s of one GPU, by
    GPU model, from a tile timed on it; ``head_read_bytes_per_s``: measured against the store;
    ``d``: features per row (the copy of X a matrix-free node gets; None: not checked).

    ``nystrom``: the same job by ``method = "nystrom"`` (:class:`NystromWork`; None: the exact
    method only), priced beside the exact operators by :func:`estimate_nystrom`.
    """

    n: int
    bytes_on_disk: int
    gram_flops: float
    flops_per_entry: float
    dtype: str
    measured: dict[str, float] = dataclasses.field(default_factory=dict)
    head_read_bytes_per_s: float | None = None
    d: int | None = None
    nystrom: NystromWork | None = None

    @property
    def itemsize(self) -> int:
        return 4 if self.dtype == "float32" else 8

    @property
    def x_bytes(self) -> int | None:
        """Bytes of X in the store's dtype (what a matrix-free node receives), or None."""
        return None if self.d is None else self.n * self.d * self.itemsize


@dataclasses.dataclass(frozen=True)
class Estimate:
    """One (node type, pool, operator): hours (start-up, gram, solve, total), the GPU nodes'
    billed hours (idle timeout included) and dollars, on-demand and spot."""

    node: Node
    nodes: int
    operator: str
    gram_hours: float
    solve_hours: float
    compute_usd: float
    storage_usd: float
    startup_hours: float = 0.0
    node_hours: float = 0.0
    spot_compute_usd: float = 0.0
    x_fits: bool = True

    @property
    def gpus(self) -> int:
        return self.nodes * self.node.gpus

    @property
    def hours(self) -> float:
        return self.startup_hours + self.gram_hours + self.solve_hours

    @property
    def usd(self) -> float:
        return self.compute_usd + self.storage_usd

    @property
    def spot_usd(self) -> float:
        return self.spot_compute_usd + self.storage_usd


def gpu_flops(work: Workload, catalog: Catalog, node: Node, a: CloudAssumptions) -> float:
    """FLOP/s of one GPU of ``node``: measured on such a GPU, else peak x gpu_efficiency."""
    if node.accelerator in work.measured:
        return work.measured[node.accelerator]
    return catalog.accelerators[node.accelerator].peak_flops(work.dtype) * a.gpu_efficiency


def path_gbps(catalog: Catalog, cloud: str, gbps: float, vcpus: int, a: CloudAssumptions) -> float:
    """Gbit/s a machine of baseline ``gbps`` and ``vcpus`` moves to the bucket on the path of
    ``a.bucket_path``: at most the bucket's per-node rate, and through an internet gateway at
    most its cap (AWS: 5 Gbit/s below 32 vCPUs, else the larger of 5 and half the rate)."""
    b = catalog.buckets[cloud]
    rate = min(gbps, b.node_gbps)
    if a.bucket_path == "internet" and b.internet_cap_gbps is not None:
        cap = b.internet_cap_gbps
        if b.internet_min_vcpus is not None and vcpus >= b.internet_min_vcpus:
            cap = max(cap, (b.internet_fraction or 0.0) * gbps)
        rate = min(rate, cap)
    return rate


def node_rate(catalog: Catalog, node: Node, a: CloudAssumptions) -> float:
    """Bytes/s one GPU node moves to or from the bucket."""
    if a.network_gbps:
        return a.network_gbps * 1e9 / 8
    gbps = path_gbps(catalog, node.cloud, node.network_gbps, node.vcpus, a)
    return gbps * 1e9 / 8 * a.network_efficiency


def head_rate(work: Workload, catalog: Catalog, cloud: str, a: CloudAssumptions) -> float:
    """Bytes/s the head reads from the bucket: --head-gbps, else measured, else published."""
    if a.head_gbps is not None:
        return a.head_gbps * 1e9 / 8
    if work.head_read_bytes_per_s is not None:
        return work.head_read_bytes_per_s
    head = catalog.heads[cloud]
    gbps = path_gbps(catalog, cloud, head.network_gbps, head.vcpus, a)
    return gbps * 1e9 / 8 * a.network_efficiency


def x_fits(work: Workload, node: Node) -> bool:
    """Whether the copy of X a matrix-free node receives fits its default object store."""
    return work.x_bytes is None or work.x_bytes <= node.object_store_bytes


def estimate(
    work: Workload, catalog: Catalog, node: Node, nodes: int, operator: str, a: CloudAssumptions
) -> Estimate:
    """Hours and dollars of the GPU nodes' start-up, the Gram (none for matrixfree) and
    ``a.iterations`` PCG iterations with ``operator`` on ``nodes`` nodes of type ``node``."""
    if operator == "nystrom":
        return estimate_nystrom(work, catalog, node, nodes, a)
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
        raise ValueError(f"operator={operator!r}; use one of {OPERATORS} or nystrom")
    stored = 0 if operator == "matrixfree" else work.bytes_on_disk
    fits = operator != "matrixfree" or x_fits(work, node)
    return _priced(catalog, node, nodes, operator, gram_s, solve_s, stored, fits, a)


def estimate_nystrom(
    work: Workload, catalog: Catalog, node: Node, nodes: int, a: CloudAssumptions
) -> Estimate:
    """Hours and dollars of a Nyström fit (``work.nystrom``) on ``nodes`` nodes of type
    ``node``, K(X, C) on the normal route, billed as a distributed solve (the GPU nodes from
    launch through the pass, plus the idle timeout). gram_hours: X sent through the head to the
    workers (each its rows: N x d x itemsize at the head's rate, where d is known), then the
    kernel entries at the GPUs' rate (as the matrix-free estimate), or the K(C, C) store's
    upload where slower; solve_hours: H = K_nmᵀK_nm and the iterations' H·P at peak float64
    FLOP/s (falkon.add_gram's products) x gpu_efficiency. The bucket keeps the K(C, C) store."""
    ny = work.nystrom
    if ny is None:
        raise ValueError("the workload has no Nyström plan; build one with "
                         "cost.nystrom_work(sizing.plan_nystrom(...))")  # fmt: skip
    gpus, rate = nodes * node.gpus, gpu_flops(work, catalog, node, a)
    # H's products run in float64 whatever the Gram's dtype (falkon.add_gram)
    gemm = catalog.accelerators[node.accelerator].peak_flops("float64") * a.gpu_efficiency
    net = nodes * node_rate(catalog, node, a)
    kernel_s = max(ny.entries * work.flops_per_entry / (gpus * rate), ny.bytes_on_disk / net)
    if work.x_bytes is not None:
        kernel_s += work.x_bytes / head_rate(work, catalog, node.cloud, a)
    solve_s = ny.gemm_flops / (gpus * gemm)
    return _priced(catalog, node, nodes, "nystrom", kernel_s, solve_s, ny.bytes_on_disk, True, a)


def _priced(
    catalog: Catalog, node: Node, nodes: int, operator: str, gram_s: float, solve_s: float,
    stored_bytes: int, fits: bool, a: CloudAssumptions,
) -> Estimate:  # fmt: skip
    """The Estimate of a run whose GPU nodes compute for gram_s and, off the head, solve_s
    seconds, its bucket keeping ``stored_bytes`` (0: no storage billed)."""
    startup, idle = a.startup_minutes / 60, a.idle_minutes / 60
    busy_s = gram_s + (0.0 if operator in HEAD_OPERATORS else solve_s)
    node_hours = startup + busy_s / 3600 + idle  # billed from launch to removal
    hours = startup + (gram_s + solve_s) / 3600
    head_usd = hours * catalog.heads[node.cloud].usd_per_hour
    compute = node_hours * nodes * node.usd_per_hour + head_usd
    spot = node_hours * nodes * node.spot_usd_per_hour + head_usd
    storage = 0.0
    if stored_bytes:
        months = max(a.keep_months, hours / _HOURS_PER_MONTH)
        storage = stored_bytes / 1e9 * catalog.buckets[node.cloud].usd_per_gb_month * months
    return Estimate(node, nodes, operator, gram_s / 3600, solve_s / 3600, compute, storage,
                    startup, node_hours, spot, fits)  # fmt: skip


def cost_table(work: Workload, catalog: Catalog, a: CloudAssumptions) -> list[Estimate]:
    """Every node type x operator for a pool of ``a.gpus`` GPUs (rounded up to whole nodes)."""
    return [
        estimate(work, catalog, node, math.ceil(a.gpus / node.gpus), op, a)
        for node in catalog.nodes
        for op in OPERATORS
    ]


def nystrom_table(work: Workload, catalog: Catalog, a: CloudAssumptions) -> list[Estimate]:
    """Every node type's Nyström estimate for the pool of :func:`cost_table` (none without a
    Nyström plan)."""
    if work.nystrom is None:
        return []
    return [estimate_nystrom(work, catalog, node, math.ceil(a.gpus / node.gpus), a)
            for node in catalog.nodes]  # fmt: skip


def recommend(
    work: Workload, catalog: Catalog, a: CloudAssumptions, deadline_hours: float
) -> tuple[Estimate | None, Estimate]:
    """(cheapest estimate finishing within the deadline, or None; the fastest estimate), over
    every node type, operator and pool of 1..max_nodes nodes (on-demand prices; a matrix-free
    route whose copy of X does not fit the nodes' object store is left out). Ties go to fewer
    nodes."""
    options = [
        estimate(work, catalog, node, k, op, a)
        for node in catalog.nodes
        for k in range(1, node.max_nodes + 1)
        for op in OPERATORS
    ]
    return pick(options, deadline_hours)


def pick(options: list[Estimate], deadline_hours: float | None) -> tuple[Estimate | None, Estimate]:
    """(the cheapest of ``options`` within the deadline (None: no deadline), or None; the
    fastest), among those whose X copy fits (all of them if none does)."""
    runnable = [e for e in options if e.x_fits] or options
    fastest = min(runnable, key=lambda e: (e.hours, e.usd))
    feasible = [e for e in runnable if deadline_hours is None or e.hours <= deadline_hours]
    best = min(feasible, key=lambda e: (round(e.usd, 2), e.nodes)) if feasible else None
    return best, fastest


def node_for(catalog: Catalog, accelerator: str | None) -> Node | None:
    """The catalog's first node type with GPUs of ``accelerator`` (None: unknown)."""
    return next((n for n in catalog.nodes if n.accelerator == accelerator), None)


def cluster_route(
    work: Workload, catalog: Catalog, node: Node, gpus: int, a: CloudAssumptions,
    deadline_hours: float | None = None,
) -> tuple[Estimate, str]:  # fmt: skip
    """The operator `plan` chooses for a cluster of ``gpus`` GPUs of ``node``'s type: the
    cheapest that finishes within the deadline (None: the cheapest), else the fastest; and why.
    What operator="auto" takes on a cluster (:func:`ntk_scale.sizing.cluster_operator`). With
    ``work.nystrom`` (method="auto") the Nyström fit is one of the options ("nystrom")."""
    nodes = max(1, math.ceil(gpus / node.gpus))
    options = [estimate(work, catalog, node, nodes, op, a) for op in OPERATORS]
    if work.nystrom is not None:
        options.append(estimate_nystrom(work, catalog, node, nodes, a))
    best, fastest = pick(options, deadline_hours)
    chosen = best or fastest
    others = ", ".join(f"{e.operator} {_hours(e.hours)} {_usd(e.usd)}"
                       + ("" if e.x_fits else " (X does not fit)")
                       for e in options if e is not chosen)  # fmt: skip
    within = "" if deadline_hours is None else f" within {_hours(deadline_hours)}"
    why = "the cheapest" + within if best is not None else f"none finishes{within}: the fastest"
    reason = (f"auto on the cluster: plan's cost model for N = {work.n:,} on {gpus} "
              f"{node.accelerator} GPUs ({node.name} figures): {chosen.operator} "
              f"{_hours(chosen.hours)} {_usd(chosen.usd)} is {why} ({others})")  # fmt: skip
    return chosen, reason


def parse_duration(text: str) -> float:
    """Hours in "24h", "2d", "90m" or "1.5" (hours)."""
    m = _DURATION.match(str(text))
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"deadline {text!r} is not a duration; write e.g. 24h, 2d or 90m")
    return float(m.group(1)) * _HOURS_PER[m.group(2)]


# -- text ---------------------------------------------------------------------------------------
def table_lines(estimates: list[Estimate], work: Workload, catalog: Catalog) -> list[str]:
    """The cost table: one row per node type, hours and dollars (on-demand, spot) of each
    operator; a matrix-free cell whose copy of X does not fit the object store is marked *."""
    head = (f"{'GPU':<5} {'node (cloud region, $/h, spot)':<52} {'pool':>8} {'Gram h':>7} "
            f"{'Gram $':>8} "
            + " ".join(f"{op + ' h':>14} {'$':>8} {'spot $':>8}" for op in OPERATORS)
            + f" {'bucket $/mo':>11}")  # fmt: skip
    lines = [head, "-" * len(head)]
    by_node: dict[str, dict[str, Estimate]] = {}
    for e in estimates:
        by_node.setdefault(e.node.name, {})[e.operator] = e
    for ops in by_node.values():
        any_e = ops["stored"]
        node, gram = any_e.node, _gram_usd(any_e, catalog)
        label = (f"{node.name} ({node.cloud} {node.region}, {node.usd_per_hour:g}, "
                 f"{node.spot_usd_per_hour:g})")  # fmt: skip
        cells = " ".join(
            f"{_hours(ops[op].hours) + ('' if ops[op].x_fits else '*'):>14} "
            f"{_usd(ops[op].usd):>8} {_usd(ops[op].spot_usd):>8}"
            for op in OPERATORS
        )
        month = work.bytes_on_disk / 1e9 * catalog.buckets[node.cloud].usd_per_gb_month
        pool = f"{any_e.gpus} GPUs"
        gram_cells = f"{_hours(any_e.gram_hours):>7} {_usd(gram):>8}"
        lines.append(f"{node.accelerator:<5} {label:<52} {pool:>8} {gram_cells} {cells} "
                     f"{_usd(month):>11}")  # fmt: skip
    return lines


def nystrom_lines(
    nystrom: list[Estimate], exact: list[Estimate], work: Workload, catalog: Catalog
) -> list[str]:
    """The Nyström rows: per node type (the exact table's pools), hours of the kernel entries
    and of the normal equations, the total, dollars on-demand and spot, the bucket's monthly
    cost, and the exact method's cheapest runnable operator on the same pool for comparison."""
    if not nystrom or work.nystrom is None:
        return []
    head = (f"{'GPU':<5} {'node (cloud region, $/h, spot)':<52} {'pool':>8} {'kernel h':>8} "
            f"{'KᵀK h':>7} {'total h':>8} {'$':>8} {'spot $':>8} {'bucket $/mo':>11} "
            f"{'exact: cheapest':>26} {'exact $ / N.':>12}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for e in nystrom:
        node = e.node
        label = (f"{node.name} ({node.cloud} {node.region}, {node.usd_per_hour:g}, "
                 f"{node.spot_usd_per_hour:g})")  # fmt: skip
        same = [x for x in exact if x.node.name == node.name and x.x_fits]
        best = min(same, key=lambda x: x.usd) if same else None
        month = work.nystrom.bytes_on_disk / 1e9 * catalog.buckets[node.cloud].usd_per_gb_month
        versus = "-" if best is None else f"{best.operator} {_hours(best.hours)} {_usd(best.usd)}"
        r = None if best is None else best.usd / e.usd
        ratio = "-" if r is None else f"{r:,.1f}x" if r < 10 else f"{r:,.0f}x"
        lines.append(f"{node.accelerator:<5} {label:<52} {f'{e.gpus} GPUs':>8} "
                     f"{_span(e.gram_hours):>8} {_span(e.solve_hours):>7} "
                     f"{_span(e.hours):>8} {_usd(e.usd):>8} {_usd(e.spot_usd):>8} "
                     f"{_usd(month):>11} {versus:>26} {ratio:>12}")  # fmt: skip
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
        f"node <-> bucket: sustained baseline network rate (not the 'up to' burst; capped at "
        f"the bucket's per-node rate) x {a.network_efficiency:g} (--network-efficiency)"
        + (f"; here {a.network_gbps:g} Gbit/s per node (--network-gbps)" if a.network_gbps else ""),
        *path_lines(catalog, a),
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
            else " (baseline x efficiency; --head-gbps)"
        ),  # fmt: skip
        f"bucket: the store kept {a.keep_months:g} month(s) (--keep-months); "
        + "; ".join(
            f"{c}: {b.service} ${b.usd_per_gb_month}/GB-month"
            for c, b in sorted(catalog.buckets.items())
        ),  # fmt: skip
        f"GPU nodes: {a.startup_minutes:g} min from launch to joining Ray (an assumption: "
        f"instance start, image pull, Ray start), billed, before the Gram; then "
        f"{a.idle_minutes:g} min idle before the autoscaler removes them (idle_timeout_minutes"
        " in deploy/*.yaml, idleTimeoutSeconds in the KubeRay manifests), billed",
        "GPU nodes billed: stored: start-up + Gram + idle (the solve runs in the head; fit "
        "releases the GPU workers before it); distributed, matrixfree: start-up + Gram + solve "
        "+ idle. The head: the whole job, on-demand",
        f"prices: on-demand, checked {catalog.prices_checked}; spot: the catalog's assumed "
        "figure per node (40% of on-demand; look the current price up) "
        "(ntk_scale/data/accelerators.toml)",
    ]


def nystrom_assumption_lines(work: Workload, a: CloudAssumptions) -> list[str]:
    """What the Nyström rows assume (none without a Nyström plan)."""
    ny = work.nystrom
    if ny is None:
        return []
    return [
        f"Nyström: M = {ny.centers:,} centres (--centers), K(X, C) on the normal route (one "
        f"pass; the workers accumulate H = K_nmᵀK_nm, M x M), {ny.iterations} PCG iterations "
        "(Falkon's preconditioner); kernel entries (RPCholesky's pool x M, K(C, C), N x M = "
        f"{ny.entries:.3e}) at the GPUs' rate as above, after X reaches the workers through the "
        "head (each its rows, at the head's rate above); H and the iterations' H·P "
        f"({ny.gemm_flops:.3e} FLOPs) at peak float64 x {a.gpu_efficiency:g}; GPU nodes "
        f"billed start-up + the pass + idle; the bucket keeps K(C, C) ({_bytes(ny.bytes_on_disk)})",
        "Nyström, not priced: centre selection and Falkon's factors run in the driver (the "
        "head; O(pool·M) entries, O(M³) flops); the workers compute H with numpy on their "
        "nodes' CPUs today (roles.NystromWorker), so its hours here are a lower bound",
    ]


def nystrom_work(plan: Any) -> NystromWork:
    """The NystromWork of a :class:`ntk_scale.sizing.NystromPlan`, on the normal route
    whatever route the plan chose locally (one pass of K(X, C), H on the workers)."""
    entries = plan.selection_entries + plan.kmm_entries + plan.knm_entries
    gemm = plan.normal_flops + plan.iterations * 2.0 * plan.m**2
    return NystromWork(centers=plan.m, entries=entries, gemm_flops=gemm,
                       iterations=plan.iterations, bytes_on_disk=plan.kmm_bytes)  # fmt: skip


def path_lines(catalog: Catalog, a: CloudAssumptions) -> list[str]:
    """Which path to the bucket the table assumes, per cloud."""
    lines = []
    for cloud, b in sorted(catalog.buckets.items()):
        if a.bucket_path == "internet" and b.internet_cap_gbps is not None:
            lines.append(f"bucket path ({cloud}): internet gateway (--bucket-path internet): "
                         f"at most {b.internet_cap_gbps:g} Gbit/s per node below "
                         f"{b.internet_min_vcpus} vCPUs, else {b.internet_fraction:g} of its "
                         "rate; create the free S3 gateway endpoint (deploy/README.md) and "
                         "plan with --bucket-path endpoint")  # fmt: skip
        else:
            cap = ""
            if b.internet_cap_gbps is not None:
                cap = (f"; through an internet gateway instead: at most "
                       f"{b.internet_cap_gbps:g} Gbit/s per node below {b.internet_min_vcpus} "
                       "vCPUs (--bucket-path internet)")  # fmt: skip
            lines.append(f"bucket path ({cloud}): {b.path or 'as the bucket allows'}{cap}")
    return lines


def x_copy_lines(work: Workload, catalog: Catalog) -> list[str]:
    """The copy of X every matrix-free node receives, against Ray's default object store on
    each node type; a clear line for each type it does not fit."""
    if work.x_bytes is None:
        return []
    lines = [
        f"matrixfree sends every GPU node a copy of X: N x d x {work.itemsize} = "
        f"{work.n:,} x {work.d:,} x {work.itemsize} = {_bytes(work.x_bytes)}, into Ray's object "
        f"store (default {RAY_OBJECT_STORE_FRACTION:.0%} of the node's RAM, at most "
        f"{_bytes(RAY_OBJECT_STORE_MAX_BYTES)}): "
        + ", ".join(f"{n.name} {_bytes(n.object_store_bytes)}" for n in catalog.nodes)
    ]
    for n in catalog.nodes:
        if not x_fits(work, n):
            lines.append(
                f"X DOES NOT FIT {n.name}'s object store ({_bytes(work.x_bytes)} > "
                f"{_bytes(n.object_store_bytes)} = 30% of {n.memory_gb:g} GiB): matrixfree on "
                "it would spill to disk or fail (marked * in the table, never recommended); "
                "give its Ray workers more (ray start --object-store-memory, rayStartParams "
                "object-store-memory), take a node with more RAM, or use stored / distributed"
            )
    return lines


def recommendation_lines(
    best: Estimate | None, fastest: Estimate, deadline_hours: float
) -> list[str]:
    if best is None:
        return [f"no node type, operator and pool meets the deadline of {_hours(deadline_hours)}; "
                f"the fastest: {_describe(fastest)}"]  # fmt: skip
    return [f"cheapest within {_hours(deadline_hours)}: {_describe(best)}"]


def _describe(e: Estimate) -> str:
    return (f"{e.nodes} x {e.node.name} ({e.gpus} {e.node.accelerator}), --operator "
            f"{e.operator}: {_hours(e.hours)} (start-up {_hours(e.startup_hours)}, Gram "
            f"{_hours(e.gram_hours)}, solve {_hours(e.solve_hours)}), {_usd(e.usd)} on-demand, "
            f"{_usd(e.spot_usd)} spot (bucket {_usd(e.storage_usd)})")  # fmt: skip


def _hours(h: float) -> str:
    if h == 0:
        return "-"
    return f"{h * 60:.0f} min" if h < 1 else f"{h:.1f} h"


def _span(h: float) -> str:
    """Hours as _hours writes them, seconds under a minute (a Nyström pass can be that short)."""
    return f"{h * 3600:.0f} s" if 0 < h < 1 / 60 else _hours(h)


def _usd(x: float) -> str:
    return f"${x:,.0f}" if x >= 10 else f"${x:,.2f}"


def workload(plan: Any, measured: dict[str, float] | None = None,
             head_read_bytes_per_s: float | None = None) -> Workload:  # fmt: skip
    """The Workload of a :class:`ntk_scale.sizing.GramPlan`."""
    return Workload(
        n=plan.n,
        d=plan.d,
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
    exact = cost_table(work, catalog, a)
    lines += table_lines(exact, work, catalog)
    if work.nystrom is not None:
        ny = work.nystrom
        lines += ["", f"Nyström (M = {ny.centers:,}): K(X, C) on the normal route, "
                  f"{ny.iterations} PCG iterations, the same pools", ""]  # fmt: skip
        lines += nystrom_lines(nystrom_table(work, catalog, a), exact, work, catalog)
    lines += ["", "assumptions:", *(f"  {line}" for line in assumption_lines(work, catalog, a))]
    lines += [f"  {line}" for line in nystrom_assumption_lines(work, a)]
    lines += [f"  {line}" for line in x_copy_lines(work, catalog)]
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
