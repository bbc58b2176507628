"""Joining Ray: the cluster named by ``RAY_ADDRESS``, else a local Ray of this process."""

from __future__ import annotations

import os

# Ray Train's preemption watcher polls for nodes being drained (spot instances); a local
# Ray is one machine that nothing drains, and its actor logs a C++ error line on every
# training ("constructor arguments in the object store and max_restarts > 0").
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def init_ray() -> None:
    """Start or join Ray once per process; never attach to a stale cluster.

    ``address="local"`` when no cluster is named: a stale ``ray_current_cluster`` file in
    Ray's temp folder would otherwise make ``ray.init()`` attach to a dead cluster.
    ``log_to_driver`` stays on: the trainings' progress lines and the workers' errors
    reach the command's output (a Ray job's logs on a cluster), where
    :mod:`pipelines.common.console` decides what the terminal shows.
    """
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or "local"
        if address == "local":
            os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
        ray.init(address=address, log_to_driver=True)
