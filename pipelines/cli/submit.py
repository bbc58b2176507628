"""``step submit CONFIG --address http://HEAD:8265``: the same pipeline as a Ray job.

Settings: the pipeline config (:class:`pipelines.workflow.config.PipelineConfig`, as for
``step run``: ``--config FILE`` or the positional ``CONFIG``, ``--set``, ``--name``,
``--storage``), validated here first; the submission itself: :class:`SubmitOptions`.

The job's entrypoint is ``step run CONFIG`` (plus the ``--set`` overrides), run on the
cluster's head node with this repository as its working directory (Ray uploads it; the
package itself is installed on every node by ``ray_cluster.yaml``'s setup commands, so
workers import the same code). Inside a Ray job ``RAY_ADDRESS`` is set, so ``step run``
joins the cluster instead of starting a local Ray: the code path is the same as locally.

Authentication (Ray 2.60 enables token auth on clusters started with ``ray start``): the
token comes from ``--token-file``, ``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH`` or
``~/.ray/auth_token`` (only when ``RAY_AUTH_MODE=token``), and is sent as an
``Authorization: Bearer`` header. It is never printed, logged, or put into the job's
runtime environment (the job runs on the head, which has its own token). A 401/403 answer
is turned into one line that says what to do.

Environment forwarded to the job when set here: ``MLFLOW_TRACKING_URI``,
``AWS_ENDPOINT_URL``/``STEP_S3_ENDPOINT_URL``, ``AWS_DEFAULT_REGION`` (not credentials:
nodes get theirs from their instance role or their own environment).
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

from pydantic import Field, field_validator

from pipelines.cli.command import Command, Invocation, Result
from pipelines.cli.run import load
from pipelines.common.errors import ExpectedFailure, InputNotFound, InvalidInput
from pipelines.common.settings import ConfigError, StrictModel
from pipelines.workflow.config import PipelineConfig

FORWARD_ENV = ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "STEP_S3_ENDPOINT_URL",
               "AWS_DEFAULT_REGION")
EXCLUDES = [".venv", "runs", "mlruns", "*.db", ".git", "**/__pycache__", ".pytest_cache",
            ".ruff_cache", "bench_results", "out"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def _default_address() -> str | None:
    return os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or None


class SubmitOptions(StrictModel):
    """How to submit (the pipeline itself is the settings)."""

    address: str | None = Field(
        default_factory=_default_address,
        description="Ray dashboard / job API address, e.g. http://HEAD:8265 (default: "
        "$RAY_API_SERVER_ADDRESS or $RAY_ADDRESS)")
    follow: bool = Field(False, description="stream the job's logs until it ends; exit with "
                         "its status")
    token_file: str | None = Field(None, description="Ray auth token file (default: "
                                   "$RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)")
    working_dir: str = Field(".", description="uploaded as the job's working directory")
    pip: list[str] = Field(default_factory=list, description="extra pip requirement(s) for "
                           "the job's runtime env (repeatable)")
    env: list[str] = Field(default_factory=list, description="extra environment "
                           "variable(s) for the job, KEY=VALUE (repeatable)")
    submission_id: str | None = Field(None, description="the job's submission id")
    dry_run: bool = Field(False, description="submit `step run --dry-run`: the job prints "
                          "which steps would run or be skipped on the cluster, and runs "
                          "nothing")
    timeout: float | None = Field(None, gt=0, description="with --follow: give up waiting "
                                  "after this many seconds")

    @field_validator("env")
    @classmethod
    def _key_value(cls, v: list[str]) -> list[str]:
        bad = [item for item in v if "=" not in item or not item.split("=", 1)[0]]
        if bad:
            raise ValueError(f"expected KEY=VALUE, got {bad[0]!r}")
        return v


def resolve_token(token_file: str | None = None) -> str | None:
    """The Ray auth token to send, or None (see the module docstring for the order)."""
    if token_file:
        path = Path(token_file).expanduser()
        if not path.is_file():
            raise InputNotFound(f"--token-file {token_file}: no such file")
        return path.read_text().strip() or None
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        if not path.is_file():
            raise InputNotFound(f"RAY_AUTH_TOKEN_PATH={path}: no such file")
        return path.read_text().strip() or None
    default = Path.home() / ".ray" / "auth_token"
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" and default.is_file():
        return default.read_text().strip() or None
    return None


def build_entrypoint(config: str, overrides: list[str], dry_run: bool = False) -> str:
    """``python -m pipelines.cli run CONFIG ...``: with ``-m`` the job's working directory
    (the uploaded repository) comes first on ``sys.path``, so the driver runs the code that
    was submitted, as the workers do (Ray puts the working dir on their path too)."""
    parts = ["python", "-m", "pipelines.cli", "run", config]
    for item in overrides:
        parts += ["--set", item]
    return shlex.join(parts + (["--dry-run"] if dry_run else []))


def build_runtime_env(working_dir: str, pip: list[str], env: list[str]) -> dict:
    env_vars = {k: os.environ[k] for k in FORWARD_ENV if os.environ.get(k)}
    for item in env:
        if "=" not in item:
            raise InvalidInput(f"--env expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        env_vars[k] = v
    runtime_env: dict = {"working_dir": working_dir, "excludes": EXCLUDES, "env_vars": env_vars}
    if pip:
        runtime_env["pip"] = list(pip)
    return runtime_env


def client_for(address: str, token: str | None):
    """A ``JobSubmissionClient`` that sends the token explicitly when there is one."""
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {token}"} if token else None
    return JobSubmissionClient(address, headers=headers)


def submit(inv: Invocation) -> Result:
    opts: SubmitOptions = inv.options
    if not opts.address:
        raise ConfigError("invalid options:\n  address: required (the Ray dashboard, e.g. "
                          "--address http://HEAD:8265, or $RAY_ADDRESS)")
    # the config was validated by the layer: a broken one fails in a second, not after
    # the upload
    token = resolve_token(opts.token_file)
    entrypoint = build_entrypoint(inv.config, inv.overrides, opts.dry_run)
    runtime_env = build_runtime_env(opts.working_dir, opts.pip, opts.env)
    try:
        client = client_for(opts.address, token)
        job_id = _submit_with_retry(client, entrypoint=entrypoint, runtime_env=runtime_env,
                                    submission_id=opts.submission_id,
                                    metadata={"step.config": inv.config})
    except Exception as err:  # noqa: BLE001 - one readable line, never the token
        raise ExpectedFailure(f"submitting to {opts.address} failed: "
                           f"{_auth_hint(err, token)}", 1) from None
    print(f"submitted job {job_id} to {opts.address}: {entrypoint}")
    doc = {"job_id": job_id, "address": opts.address, "entrypoint": entrypoint,
           "status": None}
    if not opts.follow:
        print(f"follow it with: step submit ... --follow, or `ray job logs {job_id} "
              f"--address {opts.address} --follow`")
        return Result(doc)
    status = follow(client, job_id, timeout=opts.timeout)
    print(f"job {job_id}: {status}")
    doc["status"] = status
    return Result(doc, 0 if status == "SUCCEEDED" else 1)


def _submit_with_retry(client, *, wait_s: float = 180.0, **kwargs) -> str:
    """Submit; retry while a just-started head has no job agent yet (HTTP 500
    "No available agent": 10 s to over 90 s after ``ray start --head`` on a busy 2-core
    machine)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(2.0)


def follow(client, job_id: str, *, timeout: float | None = None, poll_s: float = 1.0) -> str:
    """Print the job's logs as they grow (polling, which needs no websocket) until it ends."""
    printed = 0
    deadline = time.monotonic() + timeout if timeout else None
    while True:
        status = str(client.get_job_status(job_id)).split(".")[-1]
        logs = client.get_job_logs(job_id)
        if len(logs) > printed:
            sys.stdout.write(logs[printed:])
            sys.stdout.flush()
            printed = len(logs)
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() > deadline:
            return f"{status} (stopped following after {timeout:g}s)"
        time.sleep(poll_s)


def _auth_hint(err: Exception, token: str | None) -> str:
    text = f"{type(err).__name__}: {err}"
    if token:
        text = text.replace(token, "<token>")
    first = text.splitlines()[0][:300]
    if "401" in text or "Unauthorized" in text:
        return (first + " -- the cluster wants a Ray auth token: set RAY_AUTH_TOKEN, "
                "RAY_AUTH_TOKEN_PATH or --token-file (`ray get-auth-token` on the head "
                "prints it)")
    if "403" in text or "Forbidden" in text:
        return first + " -- the Ray auth token was rejected (wrong cluster's token?)"
    return first


COMMAND = Command(PipelineConfig, submit, options=SubmitOptions, load=load,
                  positional_config=True, config_required=True,
                  config_help="pipeline config YAML (a path inside this repository)",
                  json="write job_id, address, entrypoint and (with --follow) the final "
                  "status as JSON (a local path or s3://bucket/key)")
configure = COMMAND.configure
run = COMMAND.run
