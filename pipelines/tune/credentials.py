"""Credentials never reach Ray Tune's records.

Ray Tune copies the driver's AWS keys into every trial's ``runtime_env``
(``ray/tune/execution/class_cache.py``, ``ENV_VARS_TO_PROPAGATE``), which Ray's
``runtime_env_agent.log`` prints and the dashboard shows; and it pickles its storage
filesystem into ``tuner.pkl`` and the searcher's state files. So the driver starts Ray and
runs ``Tuner.fit()`` with the keys out of its environment (:func:`keys_out_of_env`), the
trials get them inside their arguments (:class:`pipelines.tune.trial.TrialContext`), and
Tune writes to local storage that is uploaded to an ``s3://`` storage path afterwards
(:func:`tune_storage`). See docs/pipeline.md, "Credentials on a cluster".
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

# Ray Tune copies these from the driver's environment into every trial's runtime_env
# (ray/tune/execution/class_cache.py, ENV_VARS_TO_PROPAGATE), and Ray's
# runtime_env_agent.log prints runtime_envs in plain text.
SECRET_ENV_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                   "AWS_SECURITY_TOKEN")


@contextlib.contextmanager
def keys_out_of_env() -> Iterator[None]:
    """Remove the AWS keys from this process's environment for the block, then restore
    them (also on errors). The trials get them in their arguments (``TrialContext.s3_env``);
    Tune's storage is local meanwhile (:func:`tune_storage`)."""
    saved = {k: os.environ.pop(k) for k in SECRET_ENV_VARS if k in os.environ}
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ[k] = v


def tune_storage(storage_path: str) -> tuple[str, str | None]:
    """(local storage_path for Tune's ``RunConfig``, the ``s3://`` URI to upload it to).

    Tune never gets an S3 filesystem with keys inside: it pickles its ``RunConfig`` into
    ``tuner.pkl`` and its searcher's state (with the storage filesystem) into
    ``*-state-*.json``, in the Ray session directory and in the storage itself, so keys
    in the filesystem object end up in plain files (measured with Ray 2.60). For an
    ``s3://`` storage path Tune therefore writes to a local staging directory on the
    driver and :func:`upload_results` copies it with the driver's credentials once the trials
    are done. The trials need no storage: they only report metrics (no checkpoints), and
    Tune's loggers and error files are written by the driver. The staging directory is
    named by the storage path, so a search whose driver died is found there again (and
    resumed, :mod:`pipelines.tune.resume`) by the next run on the same machine.
    """
    from pipelines.common import storage

    if storage.is_s3(storage_path):
        import hashlib
        import tempfile

        uri = storage_path.rstrip("/")
        staging = Path(tempfile.gettempdir(), "step-tune",
                       hashlib.sha256(uri.encode()).hexdigest()[:16])
        staging.mkdir(parents=True, exist_ok=True)
        return str(staging), uri
    return storage.absolute(storage_path), None


def upload_results(staging: Path, experiment: str, uri: str, remove: bool = True) -> None:
    """Tune's experiment folder, staged locally by :func:`tune_storage`, to
    ``uri/experiment``; then (``remove``) the staged experiment goes. Best effort: the
    search's record is in MLflow, Tune's files are for inspection."""
    import shutil

    from pipelines.common import storage

    try:
        if (staging / experiment).is_dir():
            storage.upload_dir(staging / experiment, f"{uri}/{experiment}")
    except Exception as err:  # a failed copy must not hide the result
        log.warning("tune: could not upload Ray Tune's results to %s: %s", uri, err)
    finally:
        if remove:
            shutil.rmtree(staging / experiment, ignore_errors=True)
