"""`park graph JOB`: the condition graph around a job, as Graphviz DOT, Mermaid, SVG or PNG.

    park graph JOB [--service NAME] [--format dot|mermaid|svg|png] [--depth N] [--output FILE]

The graph shows the jobs a job waits on, found by following each job's `when`
condition (and a race's contestants) back up to `--depth` steps. Each job is a
box with its label, state, site and short id; each AND, OR and NOT of a
condition is a small node of its own, so `a & ~b | c` reads as it was written;
an edge from a job says which of its facts the condition reads (completed,
cancelled, finished, improved(expr)). A job at another site is read through the
configured service for that site; with none (or when it cannot be read) it is
drawn as unknown, with the reason.

DOT and Mermaid are text on stdout. SVG and PNG are drawn by Graphviz's `dot`
program, which must be installed; they go to `--output FILE` or stdout (PNG
never to a terminal).

`build_graph` is pure over a `records` function, so the drawing can be tested
without a broker; `cmd_graph` does the talking, through `park.Service`.
"""
from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from park._proto import jobs_pb2 as jpb
from park.wire import STATE_NAMES, InvalidInput, condition_from_proto
from park.conditions import And, Atom, AtomKey, Condition, Not, Or
from park.cli.output import USAGE, CliError
from park.cli.targets import configured_services, open_job
from park.sites import RecordsBySite
from park.errors import ParkError

__all__ = ["Graph", "JobNode", "OpNode", "Edge", "build_graph", "to_dot", "to_mermaid", "add_graph_command",
           "FORMATS", "DEFAULT_DEPTH"]

FORMATS = ("dot", "mermaid", "svg", "png")
DEFAULT_DEPTH = 5
MAX_JOBS = 500
STATE_COLOURS = {"waiting": "#eeeeee", "queued": "#d6eaf8", "running": "#fcf3cf", "completed": "#d5f5e3",
                 "failed": "#fadbd8", "cancelled": "#e8daef", "unknown": "#ffffff"}

# -- the graph --------------------------------------------------------------------------------


@dataclass
class JobNode:
    id: str
    site: str
    job_id: str
    label: str
    state: str                 # a job state, or "unknown" when its record could not be read
    note: str = ""             # why it is unknown, or that it was not expanded
    root: bool = False


@dataclass
class OpNode:
    id: str
    op: str                    # "AND", "OR" or "NOT"


@dataclass
class Edge:
    source: str
    target: str
    label: str = ""
    dashed: bool = False       # a race's contestant, not a condition


@dataclass
class Graph:
    root: str
    nodes: dict[str, JobNode | OpNode] = field(default_factory=dict)
    edges: list[Edge] = field(default_factory=list)

    def jobs(self) -> list[JobNode]:
        return [n for n in self.nodes.values() if isinstance(n, JobNode)]


# (record, None) or (None, why it cannot be read)
Records = Callable[[str, str], "tuple[jpb.Job | None, str]"]


def _node_id(site: str, job_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", f"j_{site}_{job_id}")


def job_label(record: jpb.Job) -> str:
    spec = record.spec
    work = spec.WhichOneof("work")
    if spec.label:
        return spec.label
    if work == "call":
        return spec.call.target
    if work == "command":
        return " ".join(spec.command.argv)
    if work == "fetch":
        return f"fetch {spec.fetch.url}"
    if work == "install":
        return f"install {spec.install.name}=={spec.install.version}"
    return work or "job"


def _atom_label(key: AtomKey) -> str:
    return f"improved({key.expr})" if key.kind == "improved" else key.kind


def build_graph(site: str, job_id: str, records: Records, depth: int = DEFAULT_DEPTH) -> Graph:
    """The graph around `site`/`job_id`, following conditions `depth` steps back (0: the job alone)."""
    graph = Graph(root=_node_id(site, job_id))
    ops = iter(range(1, 1 << 30))
    queue: deque[tuple[str, str, int]] = deque([(site, job_id, 0)])
    seen = {(site, job_id)}

    def reach(key_site: str, key_job: str, level: int) -> str:
        if (key_site, key_job) not in seen and len(seen) < MAX_JOBS:
            seen.add((key_site, key_job))
            queue.append((key_site, key_job, level))
        return _node_id(key_site, key_job)

    def draw(cond: Condition, target: str, level: int) -> None:
        """Edges and operator nodes of `cond`, flowing into `target`; same-operator chains become one node."""
        if isinstance(cond, Atom):
            key = cond.key
            assert isinstance(key, AtomKey)
            graph.edges.append(Edge(reach(key.site, key.job_id, level), target, _atom_label(key)))
            return
        op = f"op{next(ops)}"
        if isinstance(cond, Not):
            graph.nodes[op] = OpNode(op, "NOT")
            operands: list[Condition] = [cond.inner]
        else:
            assert isinstance(cond, (And, Or))
            graph.nodes[op] = OpNode(op, "AND" if isinstance(cond, And) else "OR")
            operands = list(_flatten(cond))
        graph.edges.append(Edge(op, target))
        for operand in operands:
            draw(operand, op, level)

    while queue:
        node_site, node_job, level = queue.popleft()
        node = _node_id(node_site, node_job)
        record, why = records(node_site, node_job)
        if record is None:
            graph.nodes[node] = JobNode(node, node_site, node_job, "(unreadable job)", "unknown", why, node == graph.root)
            continue
        job_node = graph.nodes[node] = JobNode(node, node_site, node_job, job_label(record),
                                               STATE_NAMES.get(record.state, "unknown"), root=node == graph.root)
        try:
            cond = condition_from_proto(record.spec.when)
        except InvalidInput as exc:
            job_node.note = f"unreadable condition: {exc}"
            continue
        contestants = list(record.spec.race.contestants) if record.spec.WhichOneof("work") == "race" else []
        if cond is None and not contestants:
            continue
        if level >= depth:
            job_node.note = "waits on more (raise --depth)"
            continue
        if cond is not None:
            draw(cond, node, level + 1)
        until = record.spec.race.until
        for contestant in contestants:
            graph.edges.append(Edge(reach(node_site, contestant, level + 1), node,
                                    f"contestant until {until}" if until else "contestant", dashed=True))
    return graph


def _flatten(cond: And | Or) -> Iterator[Condition]:
    for side in (cond.left, cond.right):
        if type(side) is type(cond):
            yield from _flatten(side)   # type: ignore[arg-type]
        else:
            yield side


# -- rendering ----------------------------------------------------------------------------------

def _job_lines(node: JobNode) -> list[str]:
    lines = [node.label, f"{node.state} · {node.site}/{node.job_id[:8]}"]
    return lines + ([node.note] if node.note else [])


def _dot_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(graph: Graph) -> str:
    out = ["digraph park {", "  rankdir=LR;", '  node [fontname="Helvetica", fontsize=10];',
           '  edge [fontname="Helvetica", fontsize=9];']
    for node in graph.nodes.values():
        if isinstance(node, OpNode):
            shape = "invtriangle" if node.op == "NOT" else "circle"
            out.append(f'  {node.id} [label={_dot_string(node.op)}, shape={shape}, fontsize=8, '
                       'style=filled, fillcolor="#f4f4f4", width=0.45, fixedsize=true];')
            continue
        label = "\\n".join(_dot_string(line)[1:-1] for line in _job_lines(node))
        style = "rounded,filled,dashed" if node.state == "unknown" else "rounded,filled"
        out.append(f'  {node.id} [label="{label}", shape=box, style="{style}", '
                   f'fillcolor="{STATE_COLOURS.get(node.state, "#ffffff")}"'
                   + (", penwidth=2.5" if node.root else "") + "];")
    for edge in graph.edges:
        attrs = [f"label={_dot_string(edge.label)}"] if edge.label else []
        attrs += ["style=dashed"] if edge.dashed else []
        out.append(f"  {edge.source} -> {edge.target}" + (f" [{', '.join(attrs)}]" if attrs else "") + ";")
    return "\n".join(out + ["}"]) + "\n"


def _mermaid_text(text: str) -> str:
    # Entity codes, so that user text cannot end a label or open HTML.
    for char, code in (("#", "#35;"), ('"', "#quot;"), ("<", "#lt;"), (">", "#gt;"), ("|", "#124;")):
        text = text.replace(char, code)
    return text


def to_mermaid(graph: Graph) -> str:
    out = ["flowchart LR"]
    for node in graph.nodes.values():
        if isinstance(node, OpNode):
            out.append(f'  {node.id}{{{{"{node.op}"}}}}' if node.op == "NOT" else f'  {node.id}(("{node.op}"))')
        else:
            out.append(f'  {node.id}["{"<br/>".join(_mermaid_text(line) for line in _job_lines(node))}"]')
    for edge in graph.edges:
        arrow = "-.->" if edge.dashed else "-->"
        label = f'|"{_mermaid_text(edge.label)}"|' if edge.label else ""
        out.append(f"  {edge.source} {arrow}{label} {edge.target}")
    for state, colour in STATE_COLOURS.items():
        members = [n.id for n in graph.jobs() if n.state == state]
        if members:
            out += [f"  classDef {state} fill:{colour},stroke:#555", f"  class {','.join(members)} {state}"]
    root = graph.nodes.get(graph.root)
    if root is not None:
        out.append(f"  style {root.id} stroke-width:3px")
    return "\n".join(out) + "\n"


def render_image(dot_text: str, fmt: str) -> bytes:
    """`dot_text` drawn by Graphviz as `fmt` (svg or png); raises ParkError when dot is missing or fails."""
    dot = shutil.which("dot")
    if dot is None:
        raise ParkError(f"--format {fmt} needs Graphviz's `dot` program, which is not on PATH; install Graphviz "
                        "(e.g. `apt install graphviz`, `brew install graphviz`) or use --format dot or mermaid")
    try:
        done = subprocess.run([dot, f"-T{fmt}"], input=dot_text.encode(), capture_output=True, timeout=120,
                              check=False)
    except subprocess.TimeoutExpired:
        raise ParkError("Graphviz's dot did not finish within 120 s") from None
    if done.returncode != 0:
        raise ParkError(f"Graphviz's dot failed (exit {done.returncode}): "
                        f"{done.stderr.decode(errors='replace').strip()[:500]}")
    return done.stdout


def cmd_graph(args: argparse.Namespace) -> int:
    if args.depth < 0:
        raise CliError("--depth must be 0 or more", USAGE)
    binary = args.format == "png"
    if binary and args.output is None and sys.stdout.isatty():
        raise CliError("refusing to write PNG to a terminal; pass --output FILE or redirect stdout", USAGE)
    with open_job(args.job, args.service) as job:
        sites = RecordsBySite(job.service, job.site, configured_services())
        with contextlib.closing(sites):
            graph = build_graph(job.site, job.id, sites.record, args.depth)
    text = to_mermaid(graph) if args.format == "mermaid" else to_dot(graph)
    if args.format in ("dot", "mermaid"):
        data = text.encode()
        if args.output is None:
            print(text, end="")
            return 0
    else:
        data = render_image(text, args.format)
    if args.output is not None:
        with open(args.output, "wb") as f:
            f.write(data)
    else:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    return 0


def add_graph_command(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `park graph` on the `park` parser's subcommands."""
    command = sub.add_parser("graph", help="draw the condition graph around a job (DOT, Mermaid, SVG, PNG)")
    command.add_argument("job", metavar="JOB", help="a job id or park://SITE/jobs/ID")
    command.add_argument("--service", help="the service holding the job")
    command.add_argument("--format", choices=FORMATS, default="dot",
                         help="dot or mermaid text (default dot); svg or png need Graphviz's dot program")
    command.add_argument("--depth", type=int, default=DEFAULT_DEPTH,
                         help=f"how many steps of conditions to follow back (default {DEFAULT_DEPTH})")
    command.add_argument("--output", "-o", metavar="FILE", help="write here instead of stdout")
    command.set_defaults(run=cmd_graph)
