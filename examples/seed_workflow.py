"""The workflow of Park's design note, across two sites.

A large file is reduced at the neutron source (`sns`); the reduced file is
fetched to the compute cluster (`cluster`) with a token the user's agent
delegates to the cluster; the scientist's own model package is uploaded to the
cluster; a simulation prepares the model; the fit waits on both. Every job is
submitted at once and the script never blocks on submission. Run it again and
nothing is redone (memo hits).

    python examples/seed_workflow.py --sns sns --cluster cluster     # names from the client config
    python examples/seed_workflow.py --sns-address HOST:PORT --sns-cert FILE \\
                                     --cluster-address HOST:PORT --cluster-cert FILE

The sns broker must be able to import this file as module `seed_workflow`
(`park-broker serve ... --python-path examples`); the two brokers must be peers
(`park-broker peers add`), and the user registered at both (README).
"""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import park

HERE = Path(__file__).resolve().parent


def reduce(raw_bytes: int) -> dict[str, object]:
    """The facility's reduction (a stand-in for SnsReduce): writes the reduced file as the job's output."""
    job = park.current_job()
    data = hashlib.sha256(b"raw neutron events").digest() * (raw_bytes // 32)
    Path(job.filename).write_bytes(data)
    return {"bytes": len(data)}


def _service(name: str | None, address: str | None, cert: str | None) -> park.Service:
    return park.remote_service(address, cert=cert) if address else park.remote_service(name or "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sns", default="sns")
    parser.add_argument("--cluster", default="cluster")
    parser.add_argument("--sns-address")
    parser.add_argument("--sns-cert")
    parser.add_argument("--cluster-address")
    parser.add_argument("--cluster-cert")
    parser.add_argument("--raw-bytes", type=int, default=4 << 20)
    args = parser.parse_args()
    sns = _service(args.sns, args.sns_address, args.sns_cert)
    compufans = _service(args.cluster, args.cluster_address, args.cluster_cert)

    # Start reduction on the SNS cluster.
    with sns:
        reduction = park.submit(reduce, args.raw_bytes, output="bigfile.refl", label="reduction")

    with compufans:
        upload = park.install_service(HERE / "mymodel")
        sns_auth = park.credentials(service=sns)
        fetch = park.fetch_url(reduction.url, auth=sns_auth, when=reduction.iscompleted)
        model = park.submit("mymodel:prefit_simulation", requires=["mymodel==1.0"],
                            when=upload.iscompleted, label="prefit simulation")
        fit = park.submit("mymodel:fit", model.filename, fetch.filename, requires=["mymodel==1.0"],
                          when=model.iscompleted & fetch.isfetched, label="fit")

    result = fit.result(timeout=600)
    for name, job in (("reduction", reduction), ("upload", upload), ("fetch", fetch), ("model", model),
                      ("fit", fit)):
        print(f"{name:10} {job.site:8} {job.state:10} memo hit: {job.memo_hit}")
    print(f"fit: chisq={result['chisq']:.3f} after {result['steps']} steps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
