"""What the dashboard shows of one job, as JSON: its detail, its condition graph, its reported values.

Each function is blocking (gRPC calls through `park.Service` and `park.Job`) and is
run off the server's event loop. They reuse the library and the other tools
rather than repeat them: `root_cause` (park.causes) across sites through
`RecordsBySite` (park.sites), `build_graph` (park.cli.graph, the graph
`park graph` draws), `describe` (park.cli.output, the line `park watch` prints).
Delegated tokens never reach the page: the broker blanks them in what it
answers, and `_spec_json` blanks them again.
"""
from __future__ import annotations

import ast
import contextlib
from typing import Any

from google.protobuf import json_format

from park._proto import jobs_pb2 as jpb
from park.causes import root_cause
from park.cli.graph import JobNode, OpNode, build_graph
from park.cli.output import describe
from park.config import ServiceEntry
from park.errors import ServiceError
from park.job import Job
from park.service import Service
from park.sites import RecordsBySite
from park.wire import STATE_NAMES

__all__ = ["job_detail", "job_graph", "job_series", "thresholds"]

MAX_EVENTS = 500      # events listed in a job's detail (progress reports beyond that are in the plot)
_OPS = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">="}


def _spec_json(spec: jpb.JobSpec) -> dict[str, Any]:
    spec = jpb.JobSpec.FromString(spec.SerializeToString())
    if spec.HasField("fetch"):
        spec.fetch.token = ""
    for site in spec.grants:
        spec.grants[site] = ""
    return json_format.MessageToDict(spec)


def job_detail(service: Service, entries: list[ServiceEntry], job_id: str) -> dict[str, Any]:
    job = service.job(job_id)
    record = job.record()
    with contextlib.closing(RecordsBySite(service, record.site, entries)) as records:
        root = root_cause(record, records)
    events = [e for e in job.history() if e.kind != "improved"][-MAX_EVENTS:]
    try:
        report = job.memo_report()
        memo: dict[str, Any] = {"hit": report.hit, "job": report.job_id, "nearest": report.nearest_id,
                                "differences": list(report.differences)}
    except ServiceError as exc:     # an admin asking of another user's job: Why answers its owner only
        memo = {"hit": False, "differences": [f"not known: {exc}"]}
    work = record.spec.WhichOneof("work") or ""
    return {
        "site": record.site, "id": record.id, "asked": job_id, "url": record.url, "owner": record.owner,
        "label": record.spec.label or job_id, "work": work, "state": STATE_NAMES.get(record.state, "unknown"),
        "attempts": record.attempts, "retries": record.spec.retries,
        "submitted": record.submitted_at, "started": record.started_at, "finished": record.finished_at,
        "error": record.error, "traceback": record.traceback, "result": record.result_json,
        "attention": record.attention, "progress": dict(record.progress),
        "cause": None if not record.HasField("cause") else {
            "kind": jpb.Cause.Kind.Name(record.cause.kind).removeprefix("KIND_").lower(),
            "message": record.cause.message, "by": record.cause.by},
        "root_cause": None if root is None else {
            "site": root.site, "id": root.job_id, "label": root.label, "state": root.state, "error": root.error,
            "traceback": root.traceback, "text": str(root)},
        "outputs": [{"name": o.name, "size": o.size, "sha256": o.sha256} for o in record.outputs],
        "memo": memo,
        "race": {"contestants": list(record.spec.race.contestants), "until": record.spec.race.until}
        if work == "race" else None,
        "spec": _spec_json(record.spec),
        "events": [{"seq": e.seq, "time": e.time, "kind": e.kind, "summary": describe(e)} for e in events],
    }


def job_graph(service: Service, entries: list[ServiceEntry], site: str, job_id: str, depth: int) -> dict[str, Any]:
    """The graph `park graph` draws, as nodes and edges for the page to lay out."""
    with contextlib.closing(RecordsBySite(service, site, entries)) as records:
        graph = build_graph(site, job_id, records.record, depth)
    nodes: list[dict[str, Any]] = []
    for node in graph.nodes.values():
        if isinstance(node, OpNode):
            nodes.append({"id": node.id, "op": node.op})
        else:
            assert isinstance(node, JobNode)
            nodes.append({"id": node.id, "site": node.site, "job": node.job_id, "label": node.label,
                          "state": node.state, "note": node.note, "root": node.root})
    return {"root": graph.root, "nodes": nodes,
            "edges": [{"source": e.source, "target": e.target, "label": e.label, "dashed": e.dashed}
                      for e in graph.edges]}


def thresholds(until: str) -> list[dict[str, Any]]:
    """The `name < number` comparisons of a race's `until` expression: the lines its plot draws."""
    try:
        tree = ast.parse(until, mode="eval")
    except SyntaxError:
        return []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _OPS:
            left, right = node.left, node.comparators[0]
            if isinstance(left, ast.Name) and isinstance(right, ast.Constant) and isinstance(right.value, (int, float)):
                found.append({"name": left.id, "op": _OPS[type(node.ops[0])], "value": float(right.value)})
    return found


def _points(job: Job) -> list[dict[str, Any]]:
    return [{"time": e.time, "values": e.detail.get("values", {})} for e in job.history() if e.kind == "improved"]


def job_series(service: Service, job_id: str) -> dict[str, Any]:
    """The values a job reported over time; for a race, one line per contestant and its `until` threshold."""
    job = service.job(job_id)
    record = job.record()
    if record.spec.WhichOneof("work") != "race":
        lines = [{"site": record.site, "id": record.id, "label": record.spec.label or record.id,
                  "points": _points(job)}]
        return {"lines": lines, "thresholds": [], "until": ""}
    lines = []
    for contestant in record.spec.race.contestants:
        other = service.job(contestant)
        label = other.record().spec.label or contestant
        lines.append({"site": record.site, "id": contestant, "label": label, "points": _points(other)})
    until = record.spec.race.until
    return {"lines": lines, "thresholds": thresholds(until), "until": until}
