"""IAOps (issue #17): built-in validation throughput and SBOM-vs-OSV matching time.

- validate: 1,000 Kubernetes manifests (Deployments with a few faults each, one
  multi-document file) through the built-in rules, parse included; target
  >= 1,000 manifests/s. Baseline in the same run: parsing the same YAML alone
  with ``yaml.load_all(CSafeLoader)``; the ratio is validation time / parse time.
- sbom: a 5,000-component CycloneDX SBOM matched against 50,000 OSV records
  (PyPI, npm and Debian, several ranges each); target < 1 s for reading the
  SBOM and matching. Loading the database is reported apart (done once, at start).

Times are this process's CPU time (``time.process_time``), best of the
rounds: on a shared machine wall time measures the neighbours.

    .venv/bin/python bench/bench_iaops.py [--manifests 1000] [--components 5000] [--records 50000]
"""

from __future__ import annotations

import argparse
import json
import random
import time

import yaml

from autoecoops.platforms.iaops import osv, sbom
from autoecoops.platforms.iaops.validation import Validator

DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web-{i}
  namespace: team-{ns}
  labels: {{app: web-{i}}}
spec:
  replicas: 2
  selector: {{matchLabels: {{app: web-{i}}}}}
  template:
    metadata: {{labels: {{app: web-{i}}}}}
    spec:
      securityContext: {{runAsNonRoot: true, seccompProfile: {{type: RuntimeDefault}}}}
      containers:
        - name: app
          image: ghcr.io/example/web:{i}.0.0
          ports: [{{containerPort: 8080}}]
          resources: {{requests: {{cpu: 100m, memory: 64Mi}}, limits: {{memory: 128Mi}}}}
          readinessProbe: {{httpGet: {{path: /ready, port: 8080}}}}
          securityContext:
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: {ro}
            capabilities: {{drop: [ALL]}}
        - name: sidecar
          image: envoyproxy/envoy:v1.30.1
          resources: {{requests: {{cpu: 50m, memory: 32Mi}}, limits: {{cpu: 200m, memory: 64Mi}}}}
          livenessProbe: {{tcpSocket: {{port: 9901}}}}
          readinessProbe: {{tcpSocket: {{port: 9901}}}}
          securityContext: {{allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: {{drop: [ALL]}}}}
"""


def bench_validate(n: int) -> None:
    text = "---\n".join(
        DEPLOYMENT.format(i=i, ns=i % 20, ro="true" if i % 3 else "false") for i in range(n)
    )
    rounds = 5
    parse_times, validate_times = [], []
    validator = Validator()
    for _ in range(rounds):
        t = time.process_time()
        docs = [d for d in yaml.load_all(text, Loader=yaml.CSafeLoader) if d]
        parse_times.append(time.process_time() - t)
        t = time.process_time()
        report = validator.validate([("bench.yaml", text)])
        validate_times.append(time.process_time() - t)
    assert len(docs) == n and report.resource_count == n
    parse, full = min(parse_times), min(validate_times)
    print(f"validate: {n} manifests, {len(report.findings)} findings")
    print(f"  parse YAML alone (baseline)  {parse * 1000:8.1f} ms  {n / parse:10.0f} manifests/s")
    print(
        f"  parse + line map + rules     {full * 1000:8.1f} ms  {n / full:10.0f} manifests/s  (target >= 1,000/s)"
    )
    print(f"  ratio to parsing alone       {full / parse:8.2f}x")


PURL_TYPES = (("pypi", "PyPI"), ("npm", "npm"), ("deb", "Debian:12"))


def bench_sbom(components: int, records: int) -> None:
    rng = random.Random(17)
    packages = [(t, eco, f"pkg{i}") for i in range(components) for t, eco in [PURL_TYPES[i % 3]]]
    db = osv.OsvDatabase()
    t = time.process_time()
    for r in range(records):
        kind, eco, name = packages[rng.randrange(len(packages))]
        lo, hi = rng.randrange(0, 5), rng.randrange(5, 10)
        fixed = f"{hi}.0.0" if kind != "deb" else f"{hi}.0-1"
        db.add(
            {
                "id": f"OSV-{r}",
                "modified": "2024-01-01T00:00:00Z",
                "database_specific": {
                    "severity": rng.choice(["LOW", "MODERATE", "HIGH", "CRITICAL"])
                },
                "affected": [
                    {
                        "package": {"ecosystem": eco, "name": name},
                        "ranges": [
                            {
                                "type": "ECOSYSTEM",
                                "events": [
                                    {"introduced": f"{lo}.0.0" if kind != "deb" else f"{lo}.0-1"},
                                    {"fixed": fixed},
                                ],
                            }
                        ],
                    }
                ],
            }
        )
    db.prepare()
    load = time.process_time() - t
    doc = {
        "bomFormat": "CycloneDX",
        "specVersion": "1.6",
        "components": [
            {
                "type": "library",
                "name": name,
                "version": v,
                "purl": f"pkg:{kind}/{'debian/' if kind == 'deb' else ''}{name}@{v}"
                + ("?distro=debian-12" if kind == "deb" else ""),
            }
            for kind, _, name in packages
            for v in [
                f"{rng.randrange(0, 10)}.{rng.randrange(0, 9)}.0"
                if kind != "deb"
                else f"{rng.randrange(0, 10)}.1-1"
            ]
        ],
    }
    raw = json.dumps(doc).encode()
    osv._PARSED.clear()  # a cold version cache: the component versions are parsed in the timing
    t = time.process_time()
    _, comps = sbom.read(raw)
    read = time.process_time() - t
    t = time.process_time()
    matches = db.match(comps)
    match = time.process_time() - t
    t = time.process_time()
    json.loads(raw)
    baseline = time.process_time() - t
    print(
        f"sbom: {len(comps)} components vs {len(db)} OSV records -> {len(matches)} vulnerabilities"
    )
    print(f"  load the OSV database (once)  {load * 1000:8.1f} ms")
    print(f"  json.loads of the SBOM (baseline) {baseline * 1000:8.1f} ms")
    print(f"  read the SBOM (purls)         {read * 1000:8.1f} ms")
    print(f"  match                         {match * 1000:8.1f} ms")
    print(f"  read + match                  {(read + match) * 1000:8.1f} ms  (target < 1000 ms)")
    print(f"  ratio to json.loads alone     {(read + match) / baseline:8.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--manifests", type=int, default=1000)
    parser.add_argument("--components", type=int, default=5000)
    parser.add_argument("--records", type=int, default=50000)
    args = parser.parse_args()
    bench_validate(args.manifests)
    bench_sbom(args.components, args.records)


if __name__ == "__main__":
    main()
