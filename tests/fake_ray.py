"""A stand-in for the `ray` module's cluster queries, for tests of the GPU wait and of plan's
cluster routes (no Ray started)."""

from __future__ import annotations


class FakeRay:
    """cluster_resources() / available_resources() / nodes() of nodes given as resource dicts."""

    def __init__(self, *nodes: dict[str, float]):
        self.node_list = list(nodes)

    def nodes(self):
        return [{"Alive": True, "Resources": dict(r)} for r in self.node_list]

    def cluster_resources(self):
        total: dict[str, float] = {}
        for r in self.node_list:
            for k, v in r.items():
                total[k] = total.get(k, 0) + v
        return total

    available_resources = cluster_resources
