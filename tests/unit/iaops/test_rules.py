"""The built-in rules: every Pod Security Standards control, hygiene, NetworkPolicy and
Terraform, each finding with its rule, severity, resource, file and line."""

from __future__ import annotations

import json
import textwrap
from typing import Any

import pytest
import yaml

from autoecoops.common.v1.types_pb2 import Severity
from autoecoops.platforms.iaops.rules import RULES
from autoecoops.platforms.iaops.validation import Finding, Report, Validator

GOOD_CONTAINER: dict[str, Any] = {
    "name": "app",
    "image": "ghcr.io/org/app:1.2.3@sha256:" + "a" * 64,
    "resources": {
        "requests": {"cpu": "100m", "memory": "64Mi"},
        "limits": {"cpu": "500m", "memory": "128Mi"},
    },
    "livenessProbe": {"grpc": {"port": 5000}},
    "readinessProbe": {"grpc": {"port": 5000}},
    "securityContext": {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    },
}
DENY_ALL = {
    "apiVersion": "networking.k8s.io/v1",
    "kind": "NetworkPolicy",
    "metadata": {"name": "default-deny", "namespace": "shop"},
    "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]},
}


def deployment(
    pod: dict[str, Any] | None = None, container: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A Deployment that passes every rule, with overrides."""
    c = json.loads(json.dumps(GOOD_CONTAINER))
    c.update(container or {})
    spec: dict[str, Any] = {
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [c],
    }
    spec.update(pod or {})
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"template": {"metadata": {}, "spec": spec}},
    }


def run(*docs: dict[str, Any], skip: tuple[str, ...] = ()) -> Report:
    text = "---\n".join(yaml.safe_dump(d, sort_keys=False) for d in (*docs, DENY_ALL))
    return Validator(skip).validate([("m.yaml", text)])


def ids(report: Report) -> set[str]:
    return {f.rule_id for f in report.findings}


def test_a_hardened_deployment_has_no_finding() -> None:
    report = run(deployment())
    assert report.findings == [] and report.passed and report.resource_count == 2


@pytest.mark.parametrize(
    ("pod", "container", "rule"),
    [
        # baseline
        (
            {},
            {"securityContext": {**GOOD_CONTAINER["securityContext"], "privileged": True}},
            "AEO-K8S-001",
        ),
        ({"hostNetwork": True}, {}, "AEO-K8S-002"),
        ({"hostPID": True}, {}, "AEO-K8S-003"),
        ({"hostIPC": True}, {}, "AEO-K8S-004"),
        (
            {"volumes": [{"name": "h", "hostPath": {"path": "/var/run/docker.sock"}}]},
            {},
            "AEO-K8S-005",
        ),
        ({}, {"ports": [{"containerPort": 80, "hostPort": 8080}]}, "AEO-K8S-006"),
        (
            {},
            {
                "securityContext": {
                    **GOOD_CONTAINER["securityContext"],
                    "capabilities": {"drop": ["ALL"], "add": ["SYS_ADMIN"]},
                }
            },
            "AEO-K8S-007",
        ),
        (
            {},
            {
                "securityContext": {
                    **GOOD_CONTAINER["securityContext"],
                    "windowsOptions": {"hostProcess": True},
                }
            },
            "AEO-K8S-008",
        ),
        (
            {},
            {
                "securityContext": {
                    **GOOD_CONTAINER["securityContext"],
                    "appArmorProfile": {"type": "Unconfined"},
                }
            },
            "AEO-K8S-009",
        ),
        (
            {},
            {
                "securityContext": {
                    **GOOD_CONTAINER["securityContext"],
                    "seLinuxOptions": {"type": "spc_t"},
                }
            },
            "AEO-K8S-010",
        ),
        (
            {
                "securityContext": {
                    "runAsNonRoot": True,
                    "seccompProfile": {"type": "RuntimeDefault"},
                    "seLinuxOptions": {"user": "root"},
                }
            },
            {},
            "AEO-K8S-010",
        ),
        (
            {},
            {"securityContext": {**GOOD_CONTAINER["securityContext"], "procMount": "Unmasked"}},
            "AEO-K8S-011",
        ),
        (
            {"securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "Unconfined"}}},
            {},
            "AEO-K8S-012",
        ),
        (
            {
                "securityContext": {
                    "runAsNonRoot": True,
                    "seccompProfile": {"type": "RuntimeDefault"},
                    "sysctls": [{"name": "kernel.msgmax", "value": "1"}],
                }
            },
            {},
            "AEO-K8S-013",
        ),
        # restricted
        ({"volumes": [{"name": "n", "nfs": {"server": "x", "path": "/"}}]}, {}, "AEO-K8S-020"),
        (
            {},
            {
                "securityContext": {
                    **GOOD_CONTAINER["securityContext"],
                    "allowPrivilegeEscalation": True,
                }
            },
            "AEO-K8S-021",
        ),
        (
            {"securityContext": {"seccompProfile": {"type": "RuntimeDefault"}}},
            {
                "securityContext": {
                    k: v
                    for k, v in GOOD_CONTAINER["securityContext"].items()
                    if k != "runAsNonRoot"
                }
            },
            "AEO-K8S-022",
        ),
        (
            {},
            {"securityContext": {**GOOD_CONTAINER["securityContext"], "runAsUser": 0}},
            "AEO-K8S-023",
        ),
        ({"securityContext": {"runAsNonRoot": True}}, {}, "AEO-K8S-024"),
        (
            {},
            {
                "securityContext": {
                    **GOOD_CONTAINER["securityContext"],
                    "capabilities": {"drop": ["NET_RAW"]},
                }
            },
            "AEO-K8S-025",
        ),
        (
            {},
            {
                "securityContext": {
                    **GOOD_CONTAINER["securityContext"],
                    "capabilities": {"drop": ["ALL"], "add": ["CHOWN"]},
                }
            },
            "AEO-K8S-026",
        ),
        # hygiene
        (
            {},
            {"resources": {"limits": {"cpu": "1", "memory": "1Gi"}, "requests": {"memory": "1Gi"}}},
            "AEO-K8S-030",
        ),
        (
            {},
            {"resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "1Gi"}}},
            "AEO-K8S-031",
        ),
        (
            {},
            {"resources": {"requests": {"cpu": "1"}, "limits": {"cpu": "1", "memory": "1Gi"}}},
            "AEO-K8S-032",
        ),
        (
            {},
            {"resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "1"}}},
            "AEO-K8S-033",
        ),
        ({}, {"livenessProbe": None}, "AEO-K8S-034"),
        ({}, {"readinessProbe": None}, "AEO-K8S-035"),
        ({}, {"image": "nginx:latest"}, "AEO-K8S-036"),
        ({}, {"image": "nginx"}, "AEO-K8S-036"),
        ({}, {"image": "registry:5000/nginx:1.25"}, "AEO-K8S-037"),
        (
            {},
            {
                "securityContext": {
                    **GOOD_CONTAINER["securityContext"],
                    "readOnlyRootFilesystem": False,
                }
            },
            "AEO-K8S-038",
        ),
    ],
)
def test_each_control_fires_alone(
    pod: dict[str, Any], container: dict[str, Any], rule: str
) -> None:
    container = {k: v for k, v in container.items()}
    d = deployment(pod, {k: v for k, v in container.items() if v is not None})
    for k, v in container.items():
        if v is None:
            del d["spec"]["template"]["spec"]["containers"][0][k]
    report = run(d)
    assert rule in ids(report), report.findings
    # Exactly one control broken: no other rule fires, except the baseline/restricted pairs.
    pairs = {"AEO-K8S-007": {"AEO-K8S-026"}, "AEO-K8S-012": set(), "AEO-K8S-036": {"AEO-K8S-037"}}
    assert ids(report) - {rule} <= pairs.get(rule, set())
    f = next(f for f in report.findings if f.rule_id == rule)
    assert (
        f.severity == RULES[rule].severity and f.remediation and f.file == "m.yaml" and f.line > 0
    )
    assert str(f.resource) == "Deployment/shop/web"


def test_controls_cover_init_and_ephemeral_containers() -> None:
    bad = {**GOOD_CONTAINER, "name": "init", "securityContext": {"privileged": True}}
    report = run(
        deployment({"initContainers": [bad], "ephemeralContainers": [{**bad, "name": "dbg"}]})
    )
    privileged = [f.message for f in report.findings if f.rule_id == "AEO-K8S-001"]
    assert any("init container 'init'" in m for m in privileged)
    assert any("ephemeral container 'dbg'" in m for m in privileged)
    # Probes are for long-running containers only.
    assert not any(f.rule_id == "AEO-K8S-034" for f in report.findings)


def test_pod_level_run_as_non_root_is_inherited_and_container_false_overrides() -> None:
    inherits = deployment(
        container={
            "securityContext": {
                k: v for k, v in GOOD_CONTAINER["securityContext"].items() if k != "runAsNonRoot"
            }
        }
    )
    assert "AEO-K8S-022" not in ids(run(inherits))
    overrides = deployment(
        container={"securityContext": {**GOOD_CONTAINER["securityContext"], "runAsNonRoot": False}}
    )
    assert "AEO-K8S-022" in ids(run(overrides))


def test_every_pod_bearing_kind_is_checked_and_jobs_need_no_probes() -> None:
    pod_spec = deployment(container={"securityContext": {"privileged": True}})["spec"]["template"][
        "spec"
    ]
    kinds = {
        "Pod": {"spec": pod_spec},
        "DaemonSet": {"spec": {"template": {"spec": pod_spec}}},
        "StatefulSet": {"spec": {"template": {"spec": pod_spec}}},
        "Job": {"spec": {"template": {"spec": pod_spec}}},
        "CronJob": {"spec": {"jobTemplate": {"spec": {"template": {"spec": pod_spec}}}}},
    }
    for kind, body in kinds.items():
        doc = {
            "apiVersion": "v1",
            "kind": kind,
            "metadata": {"name": "x", "namespace": "shop"},
            **body,
        }
        report = run(doc)
        assert "AEO-K8S-001" in ids(report), kind
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "j", "namespace": "shop"},
        "spec": {
            "template": {
                "spec": {
                    **pod_spec,
                    "containers": [{k: v for k, v in GOOD_CONTAINER.items() if "Probe" not in k}],
                }
            }
        },
    }
    assert not {"AEO-K8S-034", "AEO-K8S-035"} & ids(run(job))


def test_apparmor_annotation_and_skip() -> None:
    d = deployment()
    d["spec"]["template"]["metadata"]["annotations"] = {
        "container.apparmor.security.beta.kubernetes.io/app": "unconfined"
    }
    assert "AEO-K8S-009" in ids(run(d))
    assert ids(run(d, skip=("apparmor",))) == set()
    with pytest.raises(KeyError):
        Validator(["no-such-rule"])


def test_lines_point_at_the_offending_field_or_its_parent() -> None:
    text = textwrap.dedent(
        """\
        # a comment
        apiVersion: v1
        kind: Pod
        metadata:
          name: p
          namespace: shop
        spec:
          hostPID: true
          containers:
            - name: c
              image: nginx:1.25
              securityContext:
                privileged: true
        ---
        apiVersion: v1
        kind: Pod
        metadata: {name: q, namespace: shop}
        spec:
          containers:
            - name: d
              image: busybox
        """
    )
    report = Validator().validate([("pods.yaml", text)])
    by = {(f.rule_id, f.resource.name): f for f in report.findings}
    assert by[("AEO-K8S-003", "p")].line == 8
    assert by[("AEO-K8S-001", "p")].line == 13
    assert by[("AEO-K8S-001", "p")].pointer == "/spec/containers/0/securityContext/privileged"
    assert by[("AEO-K8S-036", "q")].line == 21  # the image line of the second document
    assert by[("AEO-K8S-033", "q")].line == 20  # no resources: the container's line


def test_default_deny_network_policy_per_namespace() -> None:
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "pay"}}
    pod = deployment()
    pod["metadata"]["namespace"] = "pay"
    only_ingress = {
        **DENY_ALL,
        "metadata": {"name": "d", "namespace": "pay"},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
    }
    text = "---\n".join(yaml.safe_dump(d) for d in (ns, pod, only_ingress))
    report = Validator().validate([("ns.yaml", text)])
    got = [(f.rule_id, f.resource.kind) for f in report.findings]
    assert got == [("AEO-K8S-040", "Namespace")]  # egress missing, reported on the Namespace
    allow = {
        **only_ingress,
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{}]},
    }
    text = "---\n".join(yaml.safe_dump(d) for d in (ns, pod, allow))
    assert "AEO-K8S-039" in ids(Validator().validate([("ns.yaml", text)]))


def test_bad_yaml_is_a_finding_with_its_line() -> None:
    report = Validator().validate([("bad.yaml", "a: 1\nb: [\n")])
    (f,) = report.findings
    assert (
        f.rule_id == "AEO-PARSE-001" and f.file == "bad.yaml" and f.line == 3 and not report.passed
    )


PLAN: dict[str, Any] = {
    "format_version": "1.2",
    "terraform_version": "1.9.0",
    "planned_values": {
        "root_module": {
            "resources": [
                {
                    "address": "aws_s3_bucket.logs",
                    "mode": "managed",
                    "type": "aws_s3_bucket",
                    "name": "logs",
                    "provider_name": "registry.terraform.io/hashicorp/aws",
                    "values": {"bucket": "logs", "acl": "public-read"},
                },
                {
                    "address": "aws_security_group.ssh",
                    "mode": "managed",
                    "type": "aws_security_group",
                    "name": "ssh",
                    "provider_name": "registry.terraform.io/hashicorp/aws",
                    "values": {
                        "ingress": [
                            {
                                "from_port": 22,
                                "to_port": 22,
                                "protocol": "tcp",
                                "cidr_blocks": ["0.0.0.0/0"],
                            }
                        ]
                    },
                },
                {
                    "address": "aws_security_group.web",
                    "mode": "managed",
                    "type": "aws_security_group",
                    "name": "web",
                    "provider_name": "registry.terraform.io/hashicorp/aws",
                    "values": {
                        "ingress": [
                            {
                                "from_port": 443,
                                "to_port": 443,
                                "protocol": "tcp",
                                "cidr_blocks": ["10.0.0.0/8"],
                            }
                        ]
                    },
                },
            ],
            "child_modules": [
                {
                    "address": "module.db",
                    "resources": [
                        {
                            "address": "module.db.aws_db_instance.main",
                            "mode": "managed",
                            "type": "aws_db_instance",
                            "name": "main",
                            "provider_name": "registry.terraform.io/hashicorp/aws",
                            "values": {"storage_encrypted": False},
                        },
                        {
                            "address": "module.db.aws_ebs_volume.data",
                            "mode": "managed",
                            "type": "aws_ebs_volume",
                            "name": "data",
                            "provider_name": "registry.terraform.io/hashicorp/aws",
                            "values": {"encrypted": True},
                        },
                    ],
                }
            ],
        }
    },
}


def test_terraform_plan_rules_with_lines() -> None:
    text = json.dumps(PLAN, indent=2)
    report = Validator().validate([("plan.json", text)])
    got = {(f.rule_id, f.resource.name, f.severity) for f in report.findings}
    assert got == {
        ("AEO-TF-001", "aws_s3_bucket.logs", Severity.SEVERITY_HIGH),
        ("AEO-TF-004", "aws_security_group.ssh", Severity.SEVERITY_CRITICAL),
        ("AEO-TF-007", "module.db.aws_db_instance.main", Severity.SEVERITY_HIGH),
    }
    assert report.resource_count == 5
    lines = text.splitlines()
    acl = next(f for f in report.findings if f.rule_id == "AEO-TF-001")
    assert '"acl": "public-read"' in lines[acl.line - 1]


def test_findings_sort_most_severe_first() -> None:
    report = run(deployment({"hostPID": True}, {"image": "nginx"}))
    sev = [f.severity for f in report.findings]
    assert sev == sorted(sev, reverse=True)
    assert isinstance(report.findings[0], Finding)
