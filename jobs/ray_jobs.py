"""Runs one `fin` command on a Ray cluster through Ray's job submission API.

The scheduler's runs go here when its `ray_address` names a cluster's dashboard (http://HEAD:8265). The
command runs as the job's entrypoint on the cluster, so the cluster's nodes need the package installed
(`entrypoint`, default `fin`) and the schedule's paths on shared storage; `runtime_env` is passed to Ray
as is. Token authentication follows Ray's own settings (RAY_AUTH_MODE=token with RAY_AUTH_TOKEN or
~/.ray/auth_token).
"""

from __future__ import annotations

import re
import shlex
import time
import uuid
from dataclasses import dataclass, field

from ray.job_submission import JobStatus, JobSubmissionClient

# what Ray's job supervisor writes into a job's logs beside the command's output
_RAY_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+[A-Z]+ \S+:\d+ -- |Running entrypoint for job )")


@dataclass(frozen=True)
class RayJobResult:
    submission_id: str
    status: str  # Ray's JobStatus name: SUCCEEDED, FAILED or STOPPED
    logs: str  # the entrypoint's stdout and stderr, interleaved
    message: str  # Ray's explanation of the status

    @property
    def ok(self) -> bool:
        return self.status == JobStatus.SUCCEEDED.name

    @property
    def last_line(self) -> str:
        """The command's last line of output: Ray's own lines in the logs (its log records, the entrypoint
        announcement) are not in order with the command's, so they are skipped."""
        for text in (self.logs, self.message):  # Ray's message on a failed job ends with the logs' tail
            lines = [line for line in text.splitlines() if line.strip() and not _RAY_LINE.match(line)]
            if lines:
                return lines[-1]
        return ""


@dataclass(frozen=True)
class RayJobTarget:
    address: str  # the cluster's dashboard, http(s)://HOST:PORT
    entrypoint: str = "fin"  # how the cluster's nodes run fin
    runtime_env: dict = field(default_factory=dict)
    poll_s: float = 1.0

    def __post_init__(self):
        if not self.address.startswith(("http://", "https://")):
            raise ValueError(f"ray_address {self.address!r}: job submission needs the cluster's dashboard "
                             "address, e.g. http://127.0.0.1:8265")

    def run(self, args: list[str], name: str, timeout_s: float) -> RayJobResult:
        """Submit `fin ARGS` as a Ray job named NAME-<random>, wait for it to end (stopping it after
        timeout_s), and return its status and logs."""
        client = JobSubmissionClient(self.address)
        submission_id = f"{name}-{uuid.uuid4().hex[:8]}"  # unique even when a run database is started afresh
        client.submit_job(entrypoint=shlex.join([*shlex.split(self.entrypoint), *args]),
                          submission_id=submission_id, runtime_env=self.runtime_env or None,
                          metadata={"submitted_by": "fin schedule"})
        deadline = time.monotonic() + timeout_s
        while not (status := client.get_job_status(submission_id)).is_terminal():
            if time.monotonic() > deadline:
                client.stop_job(submission_id)
                raise TimeoutError(f"Ray job {submission_id} ran past {timeout_s:.0f} s and was stopped")
            time.sleep(self.poll_s)
        info = client.get_job_info(submission_id)
        return RayJobResult(submission_id, status.name, client.get_job_logs(submission_id), info.message or "")
