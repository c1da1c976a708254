"""Park: durable, condition-gated jobs across sites.

    import park
    cluster = park.remote_service("127.0.0.1:7702", cert="cluster/tls.crt")
    with cluster:
        a = park.submit("mymodel.sim:prefit", 3, steps=100)
        b = park.run(["reduce", "--in", "x.nxs"], when=a.iscompleted)
    print(b.result())

The public surface is exactly `__all__` (pinned by tests/test_exports.py).
"""
import os

# gRPC's C core writes its own log lines (INFO and up) to stderr; Park reports what went wrong itself,
# in words. Set before grpc is first imported; a user's own GRPC_VERBOSITY wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from park.delegation import Credentials, credentials
from park.api import CurrentJob, current_job, fetch_url, job, map, race, renew, run, submit
from park.conditions import Condition, State
from park.errors import (ConfigError, JobCancelled, JobFailed, NoServiceError, ParkError, ServiceError,
                         SubmitError)
from park.expressions import ExpressionError
from park.groups import JobGroup
from park.job import Job, JobEvent, MemoReport, Race, ResultFile
from park.packages import install_service
from park.progress import report
from park.connection import PackageInfo
from park.service import Service, remote_service

__version__ = "0.1.0"

__all__ = [
    "Condition", "ConfigError", "Credentials", "CurrentJob", "ExpressionError", "Job", "JobCancelled", "JobEvent", "JobFailed", "JobGroup", "MemoReport", "PackageInfo",
    "NoServiceError", "ParkError", "Race", "ResultFile", "Service", "ServiceError", "State", "SubmitError",
    "credentials", "current_job", "fetch_url", "install_service", "job", "map", "race", "remote_service", "renew", "report", "run", "submit",
]
