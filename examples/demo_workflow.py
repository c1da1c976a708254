"""The seed workflow with a race of fits: what `park demo` runs on its two sites.

    reduction (sns) ──► fetch bigfile.refl (cluster, a delegated token) ──┐
    install mymodel (cluster) ──► prefit simulation ──────────────────────┴─► fit seed 2 ┐
                                                                              fit seed 3 ├─► race ──► final fit
                                                                              fit seed 5 ┘

A large file is reduced at the neutron source (`sns`) and fetched to the
compute cluster (`cluster`) with a token the user's agent delegates to the
cluster; the scientist's model package is built and uploaded to the cluster; a
simulation prepares the model; three fits from different random starts (a seed
argument) race until one reports `chisq < 1.2`, and the other two are cancelled
at once; the final fit waits for the race. Every job is submitted at once; the
script blocks only to collect the outcome. Seed 3 is expected to win.

Run it again and the reduction, the fetch, the upload and the simulation are
memo hits. The race is never memoized (who wins depends on timing), its fits are
submitted with memo=False so that each run races afresh, and the final fit is
gated on this run's race, so it is new work too.

    python examples/demo_workflow.py --sns-address HOST:PORT --sns-cert FILE \\
        --cluster-address HOST:PORT --cluster-cert FILE [--summary FILE]

The sns broker must be able to import this file as module `demo_workflow`
(`park-broker serve ... --python-path examples`), the two brokers must be peers
and the user registered at both with `--allow submit,upload` (README).
`--summary FILE` writes what ran where as JSON, twice: once every submission is
acknowledged (`"phase": "submitted"`, with memo hits) and at the end (`"done"`).
Exit status: 0 when every job ended as expected, 1 otherwise, 2 for bad usage.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import park

HERE = Path(__file__).resolve().parent
GOOD_ENOUGH = "chisq < 1.2"
CONTESTANTS = {"fit seed 2": 2, "fit seed 3": 3, "fit seed 5": 5}  # label -> seed; one wins, the others are cancelled
EXPECTED = {"reduction": "completed", "install mymodel": "completed", "fetch bigfile.refl": "completed",
            "prefit simulation": "completed", "race": "completed", "final fit": "completed"}
MEMOIZED = ("reduction", "install mymodel", "fetch bigfile.refl", "prefit simulation")   # memo hits on a rerun
CHUNK = 4 << 20


# -- the job function run at sns (as demo_workflow:reduce) -------------------------

def reduce(raw_bytes: int) -> dict[str, object]:
    """The facility's reduction (a stand-in): writes the reduced file as the job's output, reporting progress."""
    block = hashlib.sha256(b"raw neutron events").digest() * (CHUNK // 32)
    written = 0
    with open(park.current_job().filename, "wb") as out:
        while written < raw_bytes:
            written += out.write(block[:raw_bytes - written])
            park.report(mib=written / (1 << 20))
            time.sleep(0.05)
    return {"bytes": written}


# -- the workflow (runs where this script runs) -----------------------------------

def workflow(sns: park.Service, cluster: park.Service, raw_bytes: int) -> dict[str, park.Job]:
    """Submit every job at once; the brokers start each when its condition holds."""
    with sns:
        reduction = park.submit(reduce, raw_bytes, output="bigfile.refl", label="reduction")
    with cluster:
        upload = park.install_service(HERE / "mymodel")
        sns_auth = park.credentials(service=sns)          # delegated by the agent to the cluster's broker
        fetch = park.fetch_url(reduction.url, auth=sns_auth, when=reduction.iscompleted, label="fetch bigfile.refl")
        prefit = park.submit("mymodel:prefit_simulation", requires=["mymodel==1.0"], when=upload.iscompleted,
                             label="prefit simulation")
        # memo=False: every run races afresh (a memoized winner would win a rerun at once).
        fits = [park.submit("mymodel:race_fit", prefit.filename, fetch.filename, seed, requires=["mymodel==1.0"],
                            when=prefit.iscompleted & fetch.isfetched, label=label, memo=False)
                for label, seed in CONTESTANTS.items()]
        race = park.race(fits, until=GOOD_ENOUGH, label="race")
        final = park.submit("mymodel:fit", prefit.filename, fetch.filename, requires=["mymodel==1.0"],
                            when=race.iscompleted, label="final fit")
    return {"reduction": reduction, "install mymodel": upload, "fetch bigfile.refl": fetch,
            "prefit simulation": prefit, **dict(zip(CONTESTANTS, fits)), "race": race, "final fit": final}


def _outcome(job: park.Job, names: dict[str, str]) -> tuple[str, str]:
    """The job's final state and a line saying what it gave, with job ids replaced by labels."""
    try:
        result = job.result(timeout=180)
    except park.JobFailed as exc:
        return "failed", exc.error
    except park.JobCancelled as exc:
        detail = exc.cause
        for job_id, label in names.items():
            detail = detail.replace(f"race {job_id}", "the race").replace(job_id, label)
        return "cancelled", detail
    if result is None:              # a fetch: what arrived
        result = {o.name: f"{o.size / (1 << 20):.1f} MiB" for o in job.record().outputs}
    return "completed", json.dumps(result, separators=(",", ":"))


def _write(path: Path | None, document: dict[str, Any]) -> None:
    if path is not None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(document, indent=1))
        os.replace(tmp, path)       # readers never see half a file


def _entries(jobs: dict[str, park.Job], outcomes: dict[str, tuple[str, str]]) -> list[dict[str, Any]]:
    return [{"label": label, "site": job.site, "id": job.record().id, "submitted_id": job.id,
             "memo_hit": job.memo_hit, "state": outcomes.get(label, ("", ""))[0],
             "detail": outcomes.get(label, ("", ""))[1]} for label, job in jobs.items()]


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run Park's demo workflow on two sites.")
    for site in ("sns", "cluster"):
        parser.add_argument(f"--{site}-address", required=True, help=f"the {site} broker's HOST:PORT")
        parser.add_argument(f"--{site}-cert", required=True, help=f"the {site} broker's tls.crt")
    parser.add_argument("--raw-bytes", type=int, default=48 << 20, help="size of the reduced file")
    parser.add_argument("--summary", type=Path, help="write what ran where to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    try:
        sns = park.remote_service(args.sns_address, cert=args.sns_cert)
        cluster = park.remote_service(args.cluster_address, cert=args.cluster_cert)
        jobs = workflow(sns, cluster, args.raw_bytes)
        hits = [label for label, job in jobs.items() if job.memo_hit]
        print(f"submitted {len(jobs)} jobs: {sum(j.site == 'sns' for j in jobs.values())} at sns, "
              f"{sum(j.site == 'cluster' for j in jobs.values())} at cluster; memo hits: "
              f"{', '.join(hits) or 'none'}", flush=True)
        _write(args.summary, {"phase": "submitted", "jobs": _entries(jobs, {})})
        names = {job.record().id: label for label, job in jobs.items()} | {j.id: label for label, j in jobs.items()}
        race = jobs["race"]
        assert isinstance(race, park.Race)
        outcomes = {"race": _outcome(race, names)}
        winner = None
        if outcomes["race"][0] == "completed":
            winner = names[race.winner.id]
            outcomes["race"] = ("completed", json.dumps({"winner": winner, **race.result()}))
        print(f"race: {winner or 'no fit'} won ({GOOD_ENOUGH})", flush=True)
        outcomes |= {label: _outcome(job, names) for label, job in jobs.items() if label != "race"}
    except (park.ParkError, TimeoutError) as exc:
        print(f"demo_workflow: {exc}", file=sys.stderr)
        return 1
    entries = _entries(jobs, outcomes)
    _write(args.summary, {"phase": "done", "winner": winner, "jobs": entries})
    if args.summary is None:   # run by `park demo`, which shows these itself, in its table
        for e in entries:
            print(f"{e['label']:<20} {e['site']:<8} {e['state']:<10} memo hit: {'yes' if e['memo_hit'] else 'no':<4} "
                  f"{e['detail']}")
    wrong = [label for label, state in EXPECTED.items() if outcomes[label][0] != state]
    states = sorted(outcomes[label][0] for label in CONTESTANTS)
    if states != ["cancelled", "cancelled", "completed"] or winner not in CONTESTANTS:
        wrong.append("the race's fits (expected one winner, two cancelled)")
    print("every job ended as expected" if not wrong else f"unexpected: {', '.join(wrong)}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
