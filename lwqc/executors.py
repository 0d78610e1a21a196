"""Where sweep points are evaluated: here, one after another, or as tasks on a Ray cluster.

``--executor local`` (default) evaluates in this process. ``--executor ray`` starts a Ray
cluster on this machine; ``ray:ADDRESS`` joins a running one (``ray start --head`` on one
machine, ``ray start --address=HEAD:6379`` on the others; every node needs lwqc installed and
the model and ``../shared`` data at the same paths). Each worker is an actor holding one CPU
that rebuilds the sweep's model once (import and analyses, as the sweep itself does); each
point is one task. Results come back to this process, which appends them to ``results.jsonl``
as they arrive (a rerun skips what is there, as with local sweeps), with progress shown.
Workers run torch on one thread each; the numbers equal the local ones to float rounding.
"""

from __future__ import annotations

import sys
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
    """A Ray actor's state: the sweep's model, imported and analysed once."""

    def __init__(self, settings: dict[str, Any]) -> None:
        import torch

        from lwqc.sweep import Sweeper

        torch.set_num_threads(1)
        self.sweeper = Sweeper(settings["model"], None, windows=settings["windows"],
                               seq_len=settings["seq_len"], analyses=settings["analyses"])

    def evaluate(self, name: str, policy: str) -> tuple[str, dict[str, Any]]:
        return name, self.sweeper.evaluate_policy(policy)


class RayExecutor:
    def __init__(self, address: str | None = None, workers: int | None = None) -> None:
        self.address, self.workers = address, workers

    def run(self, sweeper: Sweeper, points: list[SweepPoint]) -> None:
        if not points:
            return
        try:
            import ray
            from ray.util import ActorPool
        except ImportError:
            raise LwqcError("--executor ray needs Ray: pip install 'lwqc[ray]'") from None
        started = not ray.is_initialized()
        if started:
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        try:
            cpus = int(ray.cluster_resources().get("CPU", 1))
            count = min(self.workers or cpus, len(points))
            worker = ray.remote(num_cpus=1)(SweepWorker)
            actors = [worker.remote(sweeper.settings()) for _ in range(count)]
            labels = {p.name: p.labels for p in points}
            results = ActorPool(actors).map_unordered(
                lambda actor, p: actor.evaluate.remote(p.name, p.policy), points)
            with _progress(len(points)) as bar:
                for name, result in results:
                    sweeper.record(name, labels[name], result)
                    bar.update()
            for actor in actors:
                ray.kill(actor)
        finally:
            if started:
                ray.shutdown()


def parse_executor(text: str, workers: int | None = None) -> Executor:
    """``local``, ``ray`` (a cluster on this machine) or ``ray:ADDRESS``."""
    if workers is not None and workers < 1:
        raise LwqcError("--workers must be at least 1")
    if text == "local":
        if workers is not None:
            raise LwqcError("--workers applies to --executor ray")
        return LocalExecutor()
    kind, _, address = text.partition(":")
    if kind != "ray":
        raise LwqcError(f"--executor {text!r}: choose local, ray or ray:ADDRESS")
    return RayExecutor(address or None, workers)
