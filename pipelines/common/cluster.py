"""Joining Ray: the cluster named by ``RAY_ADDRESS``, else a local Ray of this process."""

from __future__ import annotations

import os


def init_ray() -> None:
    """Start or join Ray once per process; never attach to a stale cluster.

    ``address="local"`` when no cluster is named: a stale ``ray_current_cluster`` file in
    Ray's temp folder would otherwise make ``ray.init()`` attach to a dead cluster.
    ``log_to_driver`` stays on: the trainings' progress lines and the workers' errors
    reach the command's output (a Ray job's logs on a cluster).
    """
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", log_to_driver=True)
