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

The reduction's code ships to sns the way the model's ships to the cluster:
the `mymodel` package is installed at both with `park.install_service`, so the
brokers need nothing but to be peers (`park-broker peers add`) with the user
registered at both (README).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import park

HERE = Path(__file__).resolve().parent


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
        sns_upload = park.install_service(HERE / "mymodel")
        reduction = park.submit("mymodel:reduce_events", args.raw_bytes, output="bigfile.refl", label="reduction",
                                requires=["mymodel==1.0"], when=sns_upload.iscompleted)

    with compufans:
        upload = park.install_service(HERE / "mymodel")
        sns_auth = park.credentials(service=sns)
        fetch = park.fetch_url(reduction.url, auth=sns_auth, when=reduction.iscompleted)
        model = park.submit("mymodel:prefit_simulation", requires=["mymodel==1.0"],
                            when=upload.iscompleted, label="prefit simulation")
        fit = park.submit("mymodel:fit", model.filename, fetch.filename, requires=["mymodel==1.0"],
                          when=model.iscompleted & fetch.isfetched, label="fit")

    result = fit.result(timeout=600)
    for name, job in (("sns upload", sns_upload), ("reduction", reduction), ("upload", upload), ("fetch", fetch),
                      ("model", model), ("fit", fit)):
        print(f"{name:10} {job.site:8} {job.state:10} memo hit: {job.memo_hit}")
    print(f"fit: chisq={result['chisq']:.3f} after {result['steps']} steps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
