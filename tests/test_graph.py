"""`park graph`: the condition graph around a job, drawn from a real broker and from fake records."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

import park
from harness import Broker  # type: ignore[import-not-found]
from park._proto import jobs_pb2 as jpb
from park.wire import condition_to_proto
from park.cli import main
from park.conditions import Atom, AtomKey
from park.config import add_service
from park.cli.graph import build_graph, to_dot, to_mermaid
from park.sites import RecordsBySite

pytestmark = pytest.mark.timeout(120)

A, B, C, D, ROOT = ("a" * 26, "b" * 26, "c" * 26, "d" * 26, "r" * 26)


@pytest.fixture
def configured(broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Broker:
    monkeypatch.setenv("PARK_CONFIG", str(tmp_path / "client" / "config.toml"))
    add_service("sns", broker.address, broker.cert)
    return broker


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def workflow(configured: Broker) -> dict[str, park.Job]:
    with configured.service():
        a = park.submit("park_test_tasks:add", 1, 2, label="reduce")
        b = park.submit("park_test_tasks:add", 3, 4, label="calibrate")
        c = park.submit("park_test_tasks:add", 5, 6, label="simulate")
        root = park.submit("park_test_tasks:add", 7, 8, label="fit", when=a.iscompleted & ~b.iscancelled | c.isfinished)
    for job in (a, b, c, root):
        assert job.wait(timeout=60) == "completed"
    return {"a": a, "b": b, "c": c, "root": root}


def _job_nodes(text: str) -> set[str]:
    return set(re.findall(r"\bj_sns_([a-z2-7]{26})\b", text))


def test_dot_names_every_job_and_operator(workflow: dict[str, park.Job], capsys) -> None:  # type: ignore[no-untyped-def]
    status, out, err = run(capsys, "graph", workflow["root"].id)
    assert status == 0, err
    assert out.startswith("digraph park {") and out.rstrip().endswith("}")
    assert _job_nodes(out) == {job.id for job in workflow.values()}
    for label in ("reduce", "calibrate", "simulate", "fit"):
        assert f'"{label}\\ncompleted · sns/' in out
    for op in ("AND", "OR", "NOT"):
        assert f'label="{op}"' in out
    a, b, c, root = (f"j_sns_{workflow[k].id}" for k in ("a", "b", "c", "root"))
    # (a.completed AND (NOT b.cancelled)) OR c.finished -> root, edge by edge
    edges = dict(re.findall(r"(\w+ -> \w+)(?: \[label=\"([^\"]*)\"\])?;", out))
    or_node = next(e.split(" -> ")[0] for e in edges if e.endswith(f"-> {root}"))
    and_node = next(e.split(" -> ")[0] for e in edges if e.endswith(f"-> {or_node}") and e.startswith("op"))
    not_node = next(e.split(" -> ")[0] for e in edges if e.endswith(f"-> {and_node}") and e.startswith("op"))
    assert edges[f"{a} -> {and_node}"] == "completed"
    assert edges[f"{b} -> {not_node}"] == "cancelled"
    assert edges[f"{c} -> {or_node}"] == "finished"
    assert f'{or_node} [label="OR"' in out and f'{and_node} [label="AND"' in out and f'{not_node} [label="NOT"' in out


def test_mermaid_names_every_job_and_operator(workflow: dict[str, park.Job], capsys) -> None:  # type: ignore[no-untyped-def]
    status, out, err = run(capsys, "graph", f"park://sns/jobs/{workflow['root'].id}", "--format", "mermaid")
    assert status == 0, err
    assert out.startswith("flowchart LR\n")
    assert _job_nodes(out) == {job.id for job in workflow.values()}
    assert '(("AND"))' in out and '(("OR"))' in out and '{{"NOT"}}' in out
    for kind in ("completed", "cancelled", "finished"):
        assert f'-->|"{kind}"|' in out
    assert '["fit<br/>completed · sns/' in out


def test_depth_limits_how_far_back_the_graph_goes(workflow: dict[str, park.Job], capsys) -> None:  # type: ignore[no-untyped-def]
    status, out, _ = run(capsys, "graph", workflow["root"].id, "--depth", "0")
    assert status == 0
    assert _job_nodes(out) == {workflow["root"].id} and "raise --depth" in out and "->" not in out


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz is not installed")
def test_svg_and_png_are_drawn_by_graphviz(workflow: dict[str, park.Job], capsys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    status, out, err = run(capsys, "graph", workflow["root"].id, "--format", "svg")
    assert status == 0, err
    assert "<svg" in out and "calibrate" in out
    png = tmp_path / "graph.png"
    status, _, err = run(capsys, "graph", workflow["root"].id, "--format", "png", "--output", str(png))
    assert status == 0, err
    assert png.read_bytes().startswith(b"\x89PNG")


def test_svg_without_graphviz_says_what_to_install(workflow: dict[str, park.Job], capsys,  # type: ignore[no-untyped-def]
                                                   monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    status, out, err = run(capsys, "graph", workflow["root"].id, "--format", "svg")
    assert (status, out) == (1, "")
    assert "park: --format svg needs Graphviz's `dot` program" in err and "--format dot" in err


def test_an_unknown_job_fails_with_the_broker_status(configured: Broker, capsys) -> None:  # type: ignore[no-untyped-def]
    status, out, err = run(capsys, "graph", "z" * 26)
    assert status == 1 and out == ""
    assert "NOT_FOUND" in err or "not found" in err.lower()


def test_a_site_without_a_configured_service_is_unknown(configured: Broker) -> None:
    with configured.service() as service:
        sites = RecordsBySite(service, "sns", [])
        record, why = sites.record("cluster", A)
    assert record is None and why == "no configured service for site cluster"


# -- drawing, from fake records --------------------------------------------------------------------

def _record(job_id: str, label: str, state: int, when=None, race: list[str] | None = None) -> jpb.Job:  # type: ignore[no-untyped-def]
    spec = jpb.JobSpec(id=job_id, label=label, when=condition_to_proto(when))
    if race is not None:
        spec.race.contestants.extend(race)
        spec.race.until = "chisq < 1.2"
    return jpb.Job(id=job_id, site="cluster", state=state, spec=spec)


def _atom(site: str, job_id: str, kind: str, expr: str = "") -> Atom:
    return Atom(AtomKey(site, job_id, kind, expr))


def test_remote_atoms_improved_expressions_and_races() -> None:
    records = {
        ("cluster", ROOT): _record(ROOT, 'fit "final"', jpb.JOB_STATE_WAITING,
                                   when=_atom("sns", A, "completed") & _atom("cluster", B, "improved", "chisq < 1.2")
                                   & _atom("cluster", C, "completed")),
        ("cluster", B): _record(B, "race", jpb.JOB_STATE_RUNNING, race=[C, D]),
        ("cluster", C): _record(C, "fit1", jpb.JOB_STATE_RUNNING),
        ("cluster", D): _record(D, "fit2", jpb.JOB_STATE_RUNNING),
    }

    def lookup(site: str, job_id: str) -> tuple[jpb.Job | None, str]:
        found = records.get((site, job_id))
        return (found, "") if found else (None, f"no configured service for site {site}")

    graph = build_graph("cluster", ROOT, lookup)
    ops = [n for n in graph.nodes.values() if getattr(n, "op", None)]
    assert [op.op for op in ops] == ["AND"]          # a & b & c is one AND of three
    sns = graph.nodes[f"j_sns_{A}"]
    assert (sns.state, sns.site, sns.note) == ("unknown", "sns", "no configured service for site sns")
    assert sum(1 for e in graph.edges if e.target == f"j_cluster_{C}") == 0
    assert {(e.source, e.label, e.dashed) for e in graph.edges if e.target == f"j_cluster_{B}"} == {
        (f"j_cluster_{C}", "contestant until chisq < 1.2", True), (f"j_cluster_{D}", "contestant until chisq < 1.2", True)}
    dot = to_dot(graph)
    assert 'label="improved(chisq < 1.2)"' in dot and 'fit \\"final\\"' in dot and "style=dashed" in dot
    assert f"unknown · sns/{A[:8]}" in dot
    mermaid = to_mermaid(graph)
    assert '|"improved(chisq #lt; 1.2)"|' in mermaid and "fit #quot;final#quot;" in mermaid
    assert "-.->" in mermaid
