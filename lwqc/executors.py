"""Where sweep points and measured sensitivities are evaluated: here, one after another, or
as tasks on a Ray cluster.

``--executor local`` (default) evaluates in this process. ``--executor ray`` starts a Ray
cluster on this machine; ``ray:ADDRESS`` joins a running one (``ray start --head`` on one
machine, ``ray start --address=HEAD:6379`` on the others; every node needs lwqc installed and
the model and ``../shared`` data at the same paths). Each worker is an actor holding one CPU
that rebuilds the model once (a sweep's: import and analyses, as the sweep itself does; the
sensitivity pass's: the float model and its outputs on the calibration windows); each sweep
point, or each (site, width) measurement, is one task. Sweep results come back to this
process, which appends them to ``results.jsonl`` as they arrive (a rerun skips what is there,
as with local sweeps), with progress shown; measurements go to the pass's cache as locally.
Workers run torch on one thread each; the numbers equal the local ones to float rounding.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterable, Iterator, Sized
from typing import TYPE_CHECKING, Any, Protocol

from tqdm import tqdm

from lwqc.ir.errors import LwqcError

if TYPE_CHECKING:
    from lwqc.sweep import Sweeper, SweepPoint


class Executor(Protocol):
    def run(self, sweeper: Sweeper, points: list[SweepPoint]) -> None: ...


def _progress(total: int) -> tqdm:
    return tqdm(total=total, desc="sweep", disable=not sys.stderr.isatty() or total == 0)


class LocalExecutor:
    def run(self, sweeper: Sweeper, points: list[SweepPoint]) -> None:
        with _progress(len(points)) as bar:
            for point in points:
                sweeper.point(point.name, lambda p=point: sweeper.evaluate_policy(p.policy),
                              **point.labels)
                bar.update()


class SweepWorker:
    """A sweep worker's state: the sweep's model, imported and analysed once."""

    def __init__(self, settings: dict[str, Any]) -> None:
        from lwqc.sweep import Sweeper

        self.sweeper = Sweeper(settings["model"], None, windows=settings["windows"],
                               seq_len=settings["seq_len"], analyses=settings["analyses"])

    def evaluate(self, name: str, policy: str) -> tuple[str, dict[str, Any]]:
        return name, self.sweeper.evaluate_policy(policy)


class _Actor:
    """One Ray actor: torch on one thread, a worker's state built once, methods called by
    name."""

    def __init__(self, worker: Callable[..., Any], setup: tuple) -> None:
        import torch

        torch.set_num_threads(1)
        self.state = worker(*setup)

    def call(self, method: str, task: tuple) -> Any:
        return getattr(self.state, method)(*task)


class RayPool:
    """The passes' ``TaskPool`` on Ray: one actor per worker (one CPU each), tasks handed
    to whichever is free, results in completion order."""

    def __init__(self, address: str | None = None, workers: int | None = None) -> None:
        self.address, self.workers = address, workers

    def map(self, worker: Callable[..., Any], setup: tuple, method: str,
            tasks: Iterable[tuple]) -> Iterator[Any]:
        try:
            import ray
            from ray.util import ActorPool
        except ImportError:
            raise LwqcError("--executor ray needs Ray: pip install 'lwqc[ray]'") from None
        pending = iter(tasks)
        first = next(pending, None)
        if first is None:
            return
        started = not ray.is_initialized()
        if started:
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        actors = []
        try:
            count = self.workers or int(ray.cluster_resources().get("CPU", 1))
            if isinstance(tasks, Sized):
                count = min(count, len(tasks))
            actor = ray.remote(num_cpus=1)(_Actor)
            actors = [actor.remote(worker, setup) for _ in range(count)]
            pool = ActorPool(actors)

            def submit(task: tuple) -> None:
                pool.submit(lambda a, t: a.call.remote(method, t), task)

            submit(first)
            for task in itertools.islice(pending, count - 1):
                submit(task)
            while pool.has_next():  # one task in flight per worker, the next drawn on return
                result = pool.get_next_unordered()
                task = next(pending, None)
                if task is not None:
                    submit(task)
                yield result
        except ray.exceptions.RayError as exc:
            cause = getattr(exc, "cause", None) or exc  # a traceback ends with its message
            message = (str(cause).strip().splitlines() or [type(cause).__name__])[-1]
            raise LwqcError(f"a Ray worker failed: {message[:300]}") from None
        finally:
            for each in actors:
                ray.kill(each)
            if started:
                ray.shutdown()


class RayExecutor:
    def __init__(self, pool: RayPool) -> None:
        self.pool = pool

    def run(self, sweeper: Sweeper, points: list[SweepPoint]) -> None:
        labels = {p.name: p.labels for p in points}
        results = self.pool.map(SweepWorker, (sweeper.settings(),), "evaluate",
                                [(p.name, p.policy) for p in points])
        with _progress(len(points)) as bar:
            for name, result in results:
                sweeper.record(name, labels[name], result)
                bar.update()


def parse_pool(text: str, workers: int | None = None) -> RayPool | None:
    """``local`` (None: the passes run everything here), ``ray`` (a cluster on this
    machine) or ``ray:ADDRESS``."""
    if workers is not None and workers < 1:
        raise LwqcError("--workers must be at least 1")
    if text == "local":
        if workers is not None:
            raise LwqcError("--workers applies to --executor ray")
        return None
    kind, _, address = text.partition(":")
    if kind != "ray":
        raise LwqcError(f"--executor {text!r}: choose local, ray or ray:ADDRESS")
    return RayPool(address or None, workers)


def parse_executor(text: str, workers: int | None = None) -> Executor:
    """The sweep executor of ``--executor`` (see ``parse_pool``)."""
    pool = parse_pool(text, workers)
    return LocalExecutor() if pool is None else RayExecutor(pool)
