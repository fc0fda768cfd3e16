"""Run independent jobs (compare arms, reference models): in-process one after another, or as Ray tasks.

A job is a picklable callable with its arguments; both executors return results in submission order, so a
sequential and a Ray run of the same jobs are directly comparable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Job:
    name: str
    fn: Callable[..., Any]
    args: tuple = ()


def run_sequential(jobs: Sequence[Job]) -> list[Any]:
    return [job.fn(*job.args) for job in jobs]


def run_ray(jobs: Sequence[Job], address: str | None = None, num_cpus: float = 1, num_gpus: float = 0) -> list[Any]:
    """Each job is one Ray task with ``num_cpus``/``num_gpus``; ``address=None`` starts a local Ray instance."""
    try:
        import ray
    except ImportError as err:
        raise ImportError('the ray executor needs Ray: pip install -e ".[ray]"') from err
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=True, configure_logging=False)
    try:
        remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0)(_call)
        refs = [remote.options(name=job.name).remote(job.fn, job.args) for job in jobs]
        return ray.get(refs)
    finally:
        if started_here:
            ray.shutdown()


def _call(fn: Callable[..., Any], args: tuple) -> Any:
    return fn(*args)


def run_jobs(jobs: Sequence[Job], executor: str = "sequential", **options: Any) -> list[Any]:
    if executor == "sequential":
        return run_sequential(jobs)
    if executor == "ray":
        return run_ray(jobs, **options)
    raise ValueError(f"unknown executor {executor!r}; use 'sequential' or 'ray'")
