"""Work on the pool's hosts, surviving lost workers: a role attached to some hosts, calls with
timeouts, and a queue of independent tasks.

A host that dies (SIGKILL, out of memory, a lost node) is replaced by a new one in its place and
its role attached again; the task it held is run again elsewhere or on the replacement. Only an
error raised by the task's own computation counts as a failed attempt. A task that keeps killing
its host (it needs more memory than a worker has) stops the run after ``max_task_deaths``
deaths, naming the task; such a "suspect" task runs alone on its host, so a death is blamed on
the task that caused it.
"""

from __future__ import annotations

import collections
import dataclasses
import time
import uuid
import warnings
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from ntk_scale.errors import GramRunError, PlacementError, WorkerLostError
from ntk_scale.options import RunOptions
from ntk_scale.pool import Pool, Slot


@dataclasses.dataclass
class _Member:
    slot: Slot
    part: int
    state: str  # "ready", "attaching", "dead"
    ref: Any = None  # the pending attach() while attaching
    failures: int = 0  # consecutive failed starts


class RoleGroup:
    """Role ``cls`` attached to ``slots``: part k (args ``args_of(k)``) on slots[k].

    who: the role's name in messages. Close with :meth:`close` (or ``with``): the role is
    detached, the hosts stay in the pool.
    """

    def __init__(
        self,
        pool: Pool,
        slots: Sequence[Slot],
        cls: type,
        args_of: Callable[[int], tuple],
        run: RunOptions,
        who: str,
    ) -> None:
        self.pool, self.cls, self.args_of, self.run, self.who = pool, cls, args_of, run, who
        self.ray = pool.ray
        self.key = f"{who}-{uuid.uuid4().hex[:8]}"
        self.members = [_Member(slot, k, "attaching") for k, slot in enumerate(slots)]
        self.deaths = 0
        self.closed = False

    # -- attaching ------------------------------------------------------------------------------
    def start(self, wait: bool = True) -> RoleGroup:
        """Attach the role on every member; with ``wait``, block until each is ready (or
        dropped: a member that cannot start within the placement timeout gets no work)."""
        for m in self.members:
            m.ref = m.slot.handle.attach.remote(self.key, self.cls, self.args_of(m.part))
        if wait:
            self._wait_attached()
        return self

    def _wait_attached(self, require_all: bool = False) -> None:
        """Wait for pending attaches; members not started by the placement timeout are dropped
        (``require_all``: PlacementError instead, since their part cannot be computed)."""
        deadline = time.monotonic() + self.run.placement_timeout_s
        while self.attaching_refs():
            refs = self.attaching_refs()
            left = max(0.0, deadline - time.monotonic())
            done, _ = self.ray.wait(refs, num_returns=len(refs), timeout=left)
            for ref in done:
                self.settle(ref)
            if time.monotonic() >= deadline and self.attaching_refs():
                if require_all:
                    raise PlacementError(self._not_started())
                self._drop_unstarted()
        if not self.ready_members() or (require_all and self._dead_parts()):
            raise PlacementError(self._not_started())

    def _not_started(self) -> str:
        return (
            f"{self.who} workers did not start in {self.run.placement_timeout_s:.0f} s; check "
            "`ray status` for free resources or raise placement_timeout_s"
        )

    def _drop_unstarted(self) -> None:
        for m in self.members:
            if m.state == "attaching":
                m.state = "dead"
                warnings.warn(
                    f"a {self.who} worker did not start in {self.run.placement_timeout_s:.0f} s;"
                    " going on without it",
                    RuntimeWarning,
                    stacklevel=4,
                )

    def _dead_parts(self) -> list[int]:
        return [m.part for m in self.members if m.state == "dead"]

    def settle(self, ref: Any) -> _Member | None:
        """Handle a finished attach() ref: the member if it is now ready, else None (the ref was
        not an attach, or the host died while starting and a replacement is on its way)."""
        m = next((m for m in self.members if m.state == "attaching" and m.ref is ref), None)
        if m is None:
            return None
        try:
            m.slot.info = self.ray.get(ref, timeout=self.run.call_timeout_s)
        except lost_errors(self.ray):
            m.failures += 1
            self.replace(m)
            return None
        m.state, m.ref, m.failures = "ready", None, 0
        return m

    def replace(self, m: _Member) -> None:
        """m's host died: start a replacement and attach the role there (asynchronously).
        A member whose replacements keep dying while starting is given up."""
        self.deaths += 1
        if m.failures > self.run.max_task_deaths:
            m.state = "dead"
            if not self.ready_members() and not self.attaching_refs():
                raise WorkerLostError(
                    f"every {self.who} worker died, each replacement too; see the Ray logs "
                    "(`ray logs`) for why (out of memory?)"
                )
            return
        m.slot, _ = self.pool.replacement(m.slot)  # attach() runs once the new host is up
        m.state = "attaching"
        m.ref = m.slot.handle.attach.remote(self.key, self.cls, self.args_of(m.part))

    def ready_members(self) -> list[_Member]:
        return [m for m in self.members if m.state == "ready"]

    def attaching_refs(self) -> list[Any]:
        return [m.ref for m in self.members if m.state == "attaching"]

    # -- calls ----------------------------------------------------------------------------------
    def submit(self, m: _Member, method: str, *args: Any) -> Any:
        return m.slot.handle.call.remote(self.key, method, *args)

    def call_all(self, method: str, *args: Any, what: str = "working") -> list[Any]:
        """``method(*args)`` on every part, results in part order. A part whose host dies is
        attached again on a replacement and called again (at most max_task_deaths times)."""
        if self.closed:
            raise RuntimeError(f"these {self.who} workers are closed; build a new one")
        self._wait_attached(require_all=True)
        pending = {self.submit(m, method, *args): m for m in self.members}
        results: dict[int, Any] = {}
        deaths: collections.Counter[int] = collections.Counter()
        while len(results) < len(self.members):
            if self._dead_parts():
                raise WorkerLostError(f"{self.who} parts {self._dead_parts()} lost every worker")
            ref, m = self._next(pending, what)
            if m is None:
                started = self.settle(ref)
                if started is not None:
                    pending[self.submit(started, method, *args)] = started
                continue
            try:
                results[m.part] = self.ray.get(ref, timeout=self.run.call_timeout_s)
            except lost_errors(self.ray) as err:
                deaths[m.part] += 1
                if deaths[m.part] >= self.run.max_task_deaths:
                    raise WorkerLostError(_killer_message(self.who, f"part {m.part}", err)) from err
                self.replace(m)
        return [results[k] for k in range(len(self.members))]

    def _next(self, pending: dict, what: str) -> tuple[Any, _Member | None]:
        refs = list(pending) + self.attaching_refs()
        done, _ = self.ray.wait(refs, num_returns=1, timeout=self.run.call_timeout_s)
        if not done:
            raise TimeoutError(
                f"{self.who} workers took over {self.run.call_timeout_s:.0f} s {what}; check "
                "`ray status` or raise RunOptions.call_timeout_s"
            )
        ref = done[0]
        return ref, pending.pop(ref, None)

    def close(self) -> None:
        """Detach the role from every live host (idempotent); the hosts stay in the pool."""
        self.closed = True
        for m in self.members:
            if m.state != "dead":
                m.slot.handle.detach.remote(self.key)
            m.state = "dead"

    def __enter__(self) -> RoleGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def lost_errors(ray: Any) -> tuple[type, ...]:
    """The errors that mean a host is gone, not that its task failed: its actor died, or
    Ray's memory monitor killed it (OutOfMemoryError; the 10⁶-row, M = 20,000 Nyström fit
    lost both hosts that way when the driver's M x M matrices took the node to 97 % of its
    memory, and stopped instead of replacing them)."""
    ex = ray.exceptions
    return tuple(t for t in (getattr(ex, "RayActorError", None),
                             getattr(ex, "OutOfMemoryError", None)) if t is not None)  # fmt: skip


def _killer_message(who: str, task: str, err: Exception) -> str:
    return (
        f"{task} killed {who} workers repeatedly (each died while running it: {err}); the "
        "likely cause is memory: give the workers more memory, lower the tile size, or use "
        "fewer tasks per worker"
    )


@dataclasses.dataclass
class QueueStats:
    done: int = 0
    retried: int = 0
    deaths: int = 0


def run_queue(
    group: RoleGroup,
    tasks: Sequence[Hashable],
    method: str,
    args_of: Callable[[Any], tuple],
    on_done: Callable[[Any, Any], None],
    on_tick: Callable[[], None] | None = None,
    name_of: Callable[[Any], str] = str,
) -> QueueStats:
    """Run ``method(*args_of(task))`` for every task on the group's live members, at most
    ``tasks_per_worker`` in flight on each; ``on_done(task, result)`` in completion order.

    A task on a host that died is queued again (not an attempt); a task that raised is retried
    up to max_retries times; a task whose host died max_task_deaths times ends the run
    (WorkerLostError naming it); no task finished in stall_seconds ends it (GramRunError).
    """
    return _Queue(group, tasks, method, args_of, on_done, on_tick, name_of).run()


class _Queue:
    def __init__(self, group, tasks, method, args_of, on_done, on_tick, name_of):
        self.g, self.method, self.args_of, self.on_done = group, method, args_of, on_done
        self.on_tick, self.name_of, self.opts = on_tick, name_of, group.run
        self.queue = collections.deque(tasks)
        self.inflight: dict[Any, tuple[Any, _Member, Any]] = {}  # ref -> task, member, handle
        self.attempts: collections.Counter = collections.Counter()
        self.killed: collections.Counter = collections.Counter()
        self.stats = QueueStats()

    def run(self) -> QueueStats:
        last_done = time.monotonic()
        while self.queue or self.inflight:
            self._submit()
            refs = list(self.inflight) + self.g.attaching_refs()
            if not refs:
                raise WorkerLostError(f"every {self.g.who} worker is gone; see `ray logs`")
            ready, _ = self.g.ray.wait(refs, num_returns=1, timeout=self.opts.wait_seconds)
            for ref in ready:
                if self._collect(ref):
                    last_done = time.monotonic()
            if self.on_tick is not None:
                self.on_tick()
            if time.monotonic() - last_done > self.opts.stall_seconds:
                raise GramRunError(
                    f"no {self.g.who} task finished in {self.opts.stall_seconds:.0f} s; check "
                    "the workers (`ray status`) or raise RunOptions.stall_seconds"
                )
        self.stats.deaths = self.g.deaths
        return self.stats

    def _load(self) -> collections.Counter:
        return collections.Counter(id(m) for _, m, _ in self.inflight.values())

    def _submit(self) -> None:
        load = self._load()
        suspects_on = {id(m) for t, m, _ in self.inflight.values() if self.killed[t]}
        for m in sorted(self.g.ready_members(), key=lambda m: load[id(m)]):
            while self.queue and id(m) not in suspects_on:
                if load[id(m)] >= self.opts.tasks_per_worker:
                    break
                task = self.queue[0]
                if self.killed[task] and load[id(m)]:
                    break  # a task that killed a worker runs alone, so a death is its own
                self.queue.popleft()
                ref = self.g.submit(m, self.method, *self.args_of(task))
                self.inflight[ref] = (task, m, m.slot.handle)
                load[id(m)] += 1
                if self.killed[task]:
                    suspects_on.add(id(m))

    def _collect(self, ref: Any) -> bool:
        if ref not in self.inflight:
            self.g.settle(ref)
            return False
        task, m, handle = self.inflight.pop(ref)
        try:
            result = self.g.ray.get(ref, timeout=self.opts.call_timeout_s)
        except lost_errors(self.g.ray) as err:  # before RayTaskError: an OOM kill is both
            self._lost(task, m, handle, err)
            return False
        except self.g.ray.exceptions.RayTaskError as err:
            self._failed(task, err)
            return False
        self.stats.done += 1
        self.on_done(task, result)
        return True

    def _lost(self, task: Any, m: _Member, handle: Any, err: Exception) -> None:
        self.killed[task] += 1
        if self.killed[task] >= self.opts.max_task_deaths:
            raise WorkerLostError(_killer_message(self.g.who, self.name_of(task), err)) from err
        # Replace the host once: the first of its tasks to report does; the others find the
        # member on its replacement already (attaching, or ready, which must not be killed).
        if m.state == "ready" and m.slot.handle is handle:
            self.g.replace(m)
        self.stats.retried += 1
        self.queue.appendleft(task)

    def _failed(self, task: Any, err: Exception) -> None:
        self.attempts[task] += 1
        if self.attempts[task] > self.opts.max_retries:
            raise GramRunError(
                f"{self.name_of(task)} failed {self.attempts[task]} times: {err}"
            ) from err
        self.stats.retried += 1
        self.queue.appendleft(task)
