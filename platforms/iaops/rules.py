"""The built-in rules: Pod Security Standards, workload hygiene, NetworkPolicy, Terraform.

Each rule is a ``Rule`` (id, name, severity, remediation, the Checkov checks
it corresponds to) and a check function that yields ``Hit``s: the rule, an
RFC 6901 pointer to the offending field and a message. The validator turns
hits into findings with the file and line of that pointer.

The Pod Security Standards rules follow the controls of
https://kubernetes.io/docs/concepts/security/pod-security-standards/ field
by field, for every container list (containers, initContainers,
ephemeralContainers) of every pod-bearing kind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from autoecoops.common.v1.types_pb2 import Severity

CRITICAL = Severity.SEVERITY_CRITICAL
HIGH = Severity.SEVERITY_HIGH
MEDIUM = Severity.SEVERITY_MEDIUM
LOW = Severity.SEVERITY_LOW
INFO = Severity.SEVERITY_INFO

PSS = "https://kubernetes.io/docs/concepts/security/pod-security-standards/"


@dataclass(frozen=True, slots=True)
class Rule:
    """A built-in rule."""

    id: str
    name: str
    severity: Severity.ValueType
    title: str
    remediation: str
    help_uri: str = ""
    #: Checkov check ids that test the same thing (for the agreement report).
    checkov: tuple[str, ...] = ()
    #: "baseline" or "restricted" for Pod Security Standards controls.
    profile: str = ""


@dataclass(frozen=True, slots=True)
class Hit:
    """One rule broken at one field."""

    rule: Rule
    pointer: str
    message: str


def _r(*args: Any, **kwargs: Any) -> Rule:
    return Rule(*args, **kwargs)


RULES: dict[str, Rule] = {
    r.id: r
    for r in (
        # -- Pod Security Standards: baseline --------------------------------
        _r(
            "AEO-K8S-001",
            "privileged-container",
            CRITICAL,
            "Privileged containers are disallowed",
            "Remove securityContext.privileged or set it to false.",
            PSS + "#baseline",
            ("CKV_K8S_16",),
            "baseline",
        ),
        _r(
            "AEO-K8S-002",
            "host-network",
            HIGH,
            "Sharing the host network namespace is disallowed",
            "Remove spec.hostNetwork or set it to false.",
            PSS + "#baseline",
            ("CKV_K8S_19",),
            "baseline",
        ),
        _r(
            "AEO-K8S-003",
            "host-pid",
            HIGH,
            "Sharing the host PID namespace is disallowed",
            "Remove spec.hostPID or set it to false.",
            PSS + "#baseline",
            ("CKV_K8S_17",),
            "baseline",
        ),
        _r(
            "AEO-K8S-004",
            "host-ipc",
            HIGH,
            "Sharing the host IPC namespace is disallowed",
            "Remove spec.hostIPC or set it to false.",
            PSS + "#baseline",
            ("CKV_K8S_18",),
            "baseline",
        ),
        _r(
            "AEO-K8S-005",
            "host-path-volume",
            HIGH,
            "hostPath volumes are disallowed",
            "Use a persistentVolumeClaim, emptyDir, configMap or secret volume instead of hostPath.",
            PSS + "#baseline",
            (),
            "baseline",
        ),
        _r(
            "AEO-K8S-006",
            "host-port",
            MEDIUM,
            "Host ports are disallowed",
            "Remove hostPort from the container's ports; expose the pod through a Service.",
            PSS + "#baseline",
            ("CKV_K8S_26",),
            "baseline",
        ),
        _r(
            "AEO-K8S-007",
            "capabilities-baseline",
            HIGH,
            "Capabilities beyond the baseline default set are disallowed",
            "Add only AUDIT_WRITE, CHOWN, DAC_OVERRIDE, FOWNER, FSETID, KILL, MKNOD, NET_BIND_SERVICE, "
            "SETFCAP, SETGID, SETPCAP, SETUID or SYS_CHROOT.",
            PSS + "#baseline",
            ("CKV_K8S_39",),
            "baseline",
        ),
        _r(
            "AEO-K8S-008",
            "host-process",
            HIGH,
            "Windows HostProcess containers are disallowed",
            "Remove securityContext.windowsOptions.hostProcess or set it to false.",
            PSS + "#baseline",
            (),
            "baseline",
        ),
        _r(
            "AEO-K8S-009",
            "apparmor",
            MEDIUM,
            "Overriding the default AppArmor profile is disallowed",
            "Use the RuntimeDefault or a Localhost AppArmor profile, or leave it unset.",
            PSS + "#baseline",
            (),
            "baseline",
        ),
        _r(
            "AEO-K8S-010",
            "selinux",
            MEDIUM,
            "Custom SELinux users, roles or types are disallowed",
            "Leave seLinuxOptions.user and .role unset and the type one of container_t, "
            "container_init_t, container_kvm_t, container_engine_t.",
            PSS + "#baseline",
            (),
            "baseline",
        ),
        _r(
            "AEO-K8S-011",
            "proc-mount",
            MEDIUM,
            "Unmasked /proc mounts are disallowed",
            "Remove securityContext.procMount or set it to Default.",
            PSS + "#baseline",
            (),
            "baseline",
        ),
        _r(
            "AEO-K8S-012",
            "seccomp-unconfined",
            HIGH,
            "The Unconfined seccomp profile is disallowed",
            "Set seccompProfile.type to RuntimeDefault or Localhost.",
            PSS + "#baseline",
            (),
            "baseline",
        ),
        _r(
            "AEO-K8S-013",
            "unsafe-sysctls",
            MEDIUM,
            "Only the safe set of sysctls is allowed",
            "Remove the sysctl, or allow it through the kubelet and a separate namespace policy.",
            PSS + "#baseline",
            (),
            "baseline",
        ),
        # -- Pod Security Standards: restricted ------------------------------
        _r(
            "AEO-K8S-020",
            "volume-types",
            MEDIUM,
            "Only the restricted set of volume types is allowed",
            "Use configMap, csi, downwardAPI, emptyDir, ephemeral, persistentVolumeClaim, projected "
            "or secret volumes.",
            PSS + "#restricted",
            (),
            "restricted",
        ),
        _r(
            "AEO-K8S-021",
            "allow-privilege-escalation",
            HIGH,
            "Privilege escalation must be disallowed",
            "Set securityContext.allowPrivilegeEscalation: false on every container.",
            PSS + "#restricted",
            ("CKV_K8S_20",),
            "restricted",
        ),
        _r(
            "AEO-K8S-022",
            "run-as-non-root",
            MEDIUM,
            "Containers must run as non-root",
            "Set securityContext.runAsNonRoot: true on the pod or on every container.",
            PSS + "#restricted",
            ("CKV_K8S_23",),
            "restricted",
        ),
        _r(
            "AEO-K8S-023",
            "run-as-root-user",
            HIGH,
            "Containers must not run as UID 0",
            "Set securityContext.runAsUser to a non-zero UID, or leave it unset with runAsNonRoot.",
            PSS + "#restricted",
            (),
            "restricted",
        ),
        _r(
            "AEO-K8S-024",
            "seccomp-profile",
            MEDIUM,
            "A seccomp profile must be set",
            "Set securityContext.seccompProfile.type: RuntimeDefault on the pod (or Localhost).",
            PSS + "#restricted",
            ("CKV_K8S_31",),
            "restricted",
        ),
        _r(
            "AEO-K8S-025",
            "capabilities-drop-all",
            MEDIUM,
            "Containers must drop ALL capabilities",
            "Set securityContext.capabilities.drop: [ALL] on every container.",
            PSS + "#restricted",
            ("CKV_K8S_28", "CKV_K8S_37"),
            "restricted",
        ),
        _r(
            "AEO-K8S-026",
            "capabilities-restricted",
            MEDIUM,
            "Only NET_BIND_SERVICE may be added back",
            "Add no capability but NET_BIND_SERVICE.",
            PSS + "#restricted",
            (),
            "restricted",
        ),
        # -- workload hygiene -------------------------------------------------
        _r(
            "AEO-K8S-030",
            "cpu-requests",
            LOW,
            "CPU requests should be set",
            "Set resources.requests.cpu so the scheduler can place the pod.",
            "",
            ("CKV_K8S_10",),
        ),
        _r(
            "AEO-K8S-031",
            "cpu-limits",
            LOW,
            "CPU limits should be set",
            "Set resources.limits.cpu.",
            "",
            ("CKV_K8S_11",),
        ),
        _r(
            "AEO-K8S-032",
            "memory-requests",
            MEDIUM,
            "Memory requests must be set",
            "Set resources.requests.memory.",
            "",
            ("CKV_K8S_12",),
        ),
        _r(
            "AEO-K8S-033",
            "memory-limits",
            MEDIUM,
            "Memory limits must be set",
            "Set resources.limits.memory so one pod cannot exhaust its node.",
            "",
            ("CKV_K8S_13",),
        ),
        _r(
            "AEO-K8S-034",
            "liveness-probe",
            LOW,
            "A liveness probe should be configured",
            "Add a livenessProbe (e.g. grpc, httpGet or tcpSocket).",
            "",
            ("CKV_K8S_8",),
        ),
        _r(
            "AEO-K8S-035",
            "readiness-probe",
            LOW,
            "A readiness probe should be configured",
            "Add a readinessProbe so traffic reaches only ready pods.",
            "",
            ("CKV_K8S_9",),
        ),
        _r(
            "AEO-K8S-036",
            "image-latest-or-untagged",
            MEDIUM,
            "Images must be pinned, not latest",
            "Use an explicit version tag or a digest instead of :latest or no tag.",
            "",
            ("CKV_K8S_14",),
        ),
        _r(
            "AEO-K8S-037",
            "image-digest",
            LOW,
            "Images should be pinned by digest",
            "Reference the image as name@sha256:<digest> so what runs is what was verified.",
            "",
            ("CKV_K8S_43",),
        ),
        _r(
            "AEO-K8S-038",
            "read-only-root-filesystem",
            MEDIUM,
            "The root filesystem should be read-only",
            "Set securityContext.readOnlyRootFilesystem: true; mount an emptyDir where writes are needed.",
            "",
            ("CKV_K8S_22",),
        ),
        _r(
            "AEO-K8S-039",
            "default-deny-ingress",
            MEDIUM,
            "Every namespace needs a default-deny ingress NetworkPolicy",
            "Add a NetworkPolicy with podSelector: {} and policyTypes: [Ingress] and no ingress rules.",
            "https://kubernetes.io/docs/concepts/services-networking/network-policies/#default-policies",
        ),
        _r(
            "AEO-K8S-040",
            "default-deny-egress",
            LOW,
            "Every namespace should have a default-deny egress NetworkPolicy",
            "Add a NetworkPolicy with podSelector: {} and policyTypes: [Egress] and no egress rules "
            "(then allow DNS and what the pods need).",
            "https://kubernetes.io/docs/concepts/services-networking/network-policies/#default-policies",
        ),
        # -- Terraform ---------------------------------------------------------
        _r(
            "AEO-TF-001",
            "s3-bucket-public-acl",
            HIGH,
            "S3 buckets must not have a public ACL",
            'Use acl = "private" (or no ACL) and grant access through policies.',
            "",
            ("CKV_AWS_20",),
        ),
        _r(
            "AEO-TF-002",
            "s3-public-access-block",
            HIGH,
            "S3 public access blocks must block all public access",
            "Set block_public_acls, block_public_policy, ignore_public_acls and restrict_public_buckets to true.",
            "",
            ("CKV_AWS_53", "CKV_AWS_54", "CKV_AWS_55", "CKV_AWS_56"),
        ),
        _r(
            "AEO-TF-003",
            "gcs-bucket-public",
            HIGH,
            "GCS buckets must not be public",
            "Do not grant roles to allUsers or allAuthenticatedUsers.",
            "",
            ("CKV_GCP_28",),
        ),
        _r(
            "AEO-TF-004",
            "security-group-open",
            HIGH,
            "Security groups must not allow ingress from the whole internet",
            "Restrict cidr_blocks to known ranges; put public services behind a load balancer.",
            "",
            ("CKV_AWS_24", "CKV_AWS_25", "CKV_AWS_260", "CKV_AWS_277"),
        ),
        _r(
            "AEO-TF-005",
            "firewall-open",
            HIGH,
            "Firewalls must not allow ingress from 0.0.0.0/0",
            "Restrict source_ranges to known ranges.",
            "",
            ("CKV_GCP_2", "CKV_GCP_3"),
        ),
        _r(
            "AEO-TF-006",
            "ebs-unencrypted",
            HIGH,
            "EBS volumes must be encrypted",
            "Set encrypted = true (and a kms_key_id).",
            "",
            ("CKV_AWS_3",),
        ),
        _r(
            "AEO-TF-007",
            "rds-unencrypted",
            HIGH,
            "Database storage must be encrypted",
            "Set storage_encrypted = true.",
            "",
            ("CKV_AWS_16",),
        ),
        _r(
            "AEO-TF-008",
            "efs-unencrypted",
            HIGH,
            "EFS file systems must be encrypted",
            "Set encrypted = true.",
            "",
            ("CKV_AWS_42",),
        ),
        _r(
            "AEO-TF-009",
            "azure-container-public",
            HIGH,
            "Azure storage containers must be private",
            'Set container_access_type = "private".',
            "",
            ("CKV_AZURE_34",),
        ),
        _r(
            "AEO-TF-010",
            "s3-bucket-policy-public",
            HIGH,
            "S3 bucket policies must not allow everyone",
            'Do not use Principal "*" with Allow.',
            "",
            ("CKV_AWS_70",),
        ),
    )
}


def as_map(value: Any) -> Mapping[str, Any]:
    """``value`` when it is a mapping, else an empty one (YAML may hold anything)."""
    return value if isinstance(value, Mapping) else {}


def as_list(value: Any) -> list[Any]:
    """``value`` when it is a list, else an empty one."""
    return value if isinstance(value, list) else []


# -- Kubernetes -----------------------------------------------------------------

#: Where each pod-bearing kind keeps its pod spec.
POD_SPEC_PATHS: Mapping[str, tuple[str, ...]] = {
    "Pod": ("spec",),
    "PodTemplate": ("template", "spec"),
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "ReplicationController": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}
#: Kinds that run to completion: probes do not apply (as Checkov skips them).
BATCH_KINDS = frozenset({"Job", "CronJob"})
CONTAINER_LISTS = ("containers", "initContainers", "ephemeralContainers")

BASELINE_CAPS = frozenset(
    [
        "AUDIT_WRITE",
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "FSETID",
        "KILL",
        "MKNOD",
        "NET_BIND_SERVICE",
        "SETFCAP",
        "SETGID",
        "SETPCAP",
        "SETUID",
        "SYS_CHROOT",
    ]
)
SAFE_SYSCTLS = frozenset(
    [
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
        "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
    ]
)
SELINUX_TYPES = frozenset(
    {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
)
RESTRICTED_VOLUMES = frozenset(
    {
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    }
)
APPARMOR_PREFIX = "container.apparmor.security.beta.kubernetes.io/"


def _esc(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def _get(obj: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj


def _caps(value: Any) -> list[str]:
    return [str(c).upper().removeprefix("CAP_") for c in value] if isinstance(value, list) else []


@dataclass(frozen=True, slots=True)
class PodSpec:
    """A pod spec found in an object, with pointers to it and its metadata."""

    kind: str
    spec: Mapping[str, Any]
    pointer: str
    metadata: Mapping[str, Any]
    metadata_pointer: str


def pod_spec(obj: Mapping[str, Any]) -> PodSpec | None:
    """The pod spec of a pod-bearing object, or None."""
    kind = obj.get("kind")
    path = POD_SPEC_PATHS.get(kind) if isinstance(kind, str) else None
    if path is None:
        return None
    spec = _get(obj, *path)
    if not isinstance(spec, Mapping):
        return None
    meta_path = (*path[:-1], "metadata")
    meta = _get(obj, *meta_path)
    return PodSpec(
        kind=str(kind),
        spec=spec,
        pointer="/" + "/".join(path),
        metadata=meta if isinstance(meta, Mapping) else {},
        metadata_pointer="/" + "/".join(meta_path),
    )


def _containers(ps: PodSpec) -> Iterator[tuple[str, str, Mapping[str, Any]]]:
    for list_name in CONTAINER_LISTS:
        items = ps.spec.get(list_name)
        if isinstance(items, list):
            for i, c in enumerate(items):
                if isinstance(c, Mapping):
                    yield list_name, f"{ps.pointer}/{list_name}/{i}", c


def _label(list_name: str, c: Mapping[str, Any]) -> str:
    what = {"containers": "container", "initContainers": "init container"}.get(
        list_name, "ephemeral container"
    )
    return f"{what} {c.get('name', '?')!r}"


def check_pod(obj: Mapping[str, Any]) -> Iterator[Hit]:
    """Every Pod Security Standards control and hygiene rule for one object."""
    ps = pod_spec(obj)
    if ps is None:
        return
    spec, p = ps.spec, ps.pointer
    R = RULES
    pod_sc = as_map(spec.get("securityContext"))
    psc = f"{p}/securityContext"

    for field, rid in (
        ("hostNetwork", "AEO-K8S-002"),
        ("hostPID", "AEO-K8S-003"),
        ("hostIPC", "AEO-K8S-004"),
    ):
        if spec.get(field) is True:
            yield Hit(R[rid], f"{p}/{field}", f"spec.{field} is true")

    volumes = as_list(spec.get("volumes"))
    for i, vol in enumerate(volumes):
        if not isinstance(vol, Mapping):
            continue
        vname = vol.get("name", "?")
        if "hostPath" in vol:
            path = _get(vol, "hostPath", "path")
            yield Hit(
                R["AEO-K8S-005"],
                f"{p}/volumes/{i}/hostPath",
                f"volume {vname!r} mounts host path {path!r}",
            )
        types = [k for k in vol if k != "name"]
        bad = [t for t in types if t not in RESTRICTED_VOLUMES and t != "hostPath"]
        if bad:
            yield Hit(
                R["AEO-K8S-020"],
                f"{p}/volumes/{i}/{_esc(bad[0])}",
                f"volume {vname!r} is of type {bad[0]}, not allowed by the restricted profile",
            )

    sysctls = as_list(pod_sc.get("sysctls"))
    for i, s in enumerate(sysctls):
        name = s.get("name") if isinstance(s, Mapping) else None
        if name not in SAFE_SYSCTLS:
            yield Hit(
                R["AEO-K8S-013"], f"{psc}/sysctls/{i}", f"sysctl {name!r} is not in the safe set"
            )

    # Pod-level fields that containers inherit.
    pod_seccomp = _get(pod_sc, "seccompProfile", "type")
    pod_non_root = pod_sc.get("runAsNonRoot")
    yield from _security_fields(pod_sc, psc, "the pod", pod_level=True)
    if pod_sc.get("runAsUser") == 0:
        yield Hit(R["AEO-K8S-023"], f"{psc}/runAsUser", "the pod sets runAsUser: 0")

    annotations = as_map(ps.metadata.get("annotations"))
    for key, value in annotations.items():
        if str(key).startswith(APPARMOR_PREFIX) and not (
            value == "runtime/default" or str(value).startswith("localhost/")
        ):
            yield Hit(
                R["AEO-K8S-009"],
                f"{ps.metadata_pointer}/annotations/{_esc(str(key))}",
                f"AppArmor profile {value!r} for {key.removeprefix(APPARMOR_PREFIX)!r}",
            )

    for list_name, cp, c in _containers(ps):
        who = _label(list_name, c)
        sc = as_map(c.get("securityContext"))
        scp = f"{cp}/securityContext"
        if sc.get("privileged") is True:
            yield Hit(R["AEO-K8S-001"], f"{scp}/privileged", f"{who} is privileged")
        ports = as_list(c.get("ports"))
        for i, port in enumerate(ports):
            if isinstance(port, Mapping) and port.get("hostPort"):
                yield Hit(
                    R["AEO-K8S-006"],
                    f"{cp}/ports/{i}/hostPort",
                    f"{who} binds host port {port['hostPort']}",
                )
        yield from _security_fields(sc, scp, who, pod_level=False)
        added = _caps(_get(sc, "capabilities", "add"))
        beyond = [cap for cap in added if cap not in BASELINE_CAPS]
        if beyond:
            yield Hit(
                R["AEO-K8S-007"], f"{scp}/capabilities/add", f"{who} adds {', '.join(beyond)}"
            )
        if [cap for cap in added if cap != "NET_BIND_SERVICE"]:
            yield Hit(
                R["AEO-K8S-026"],
                f"{scp}/capabilities/add",
                f"{who} adds {', '.join(cap for cap in added if cap != 'NET_BIND_SERVICE')}",
            )
        if "ALL" not in _caps(_get(sc, "capabilities", "drop")):
            yield Hit(
                R["AEO-K8S-025"],
                f"{scp}/capabilities/drop" if "capabilities" in sc else scp,
                f"{who} does not drop ALL capabilities",
            )
        if sc.get("allowPrivilegeEscalation") is not False:
            yield Hit(
                R["AEO-K8S-021"],
                f"{scp}/allowPrivilegeEscalation" if sc else cp,
                f"{who} does not set allowPrivilegeEscalation: false",
            )
        if sc.get("runAsNonRoot") is not True and not (
            pod_non_root is True and sc.get("runAsNonRoot") is None
        ):
            yield Hit(
                R["AEO-K8S-022"],
                f"{scp}/runAsNonRoot" if "runAsNonRoot" in sc else (scp if sc else cp),
                f"{who} may run as root (runAsNonRoot is not true on it or the pod)",
            )
        if sc.get("runAsUser") == 0:
            yield Hit(R["AEO-K8S-023"], f"{scp}/runAsUser", f"{who} sets runAsUser: 0")
        c_seccomp = _get(sc, "seccompProfile", "type")
        effective = c_seccomp if c_seccomp is not None else pod_seccomp
        if effective not in ("RuntimeDefault", "Localhost") and effective != "Unconfined":
            yield Hit(
                R["AEO-K8S-024"],
                f"{scp}/seccompProfile" if sc else cp,
                f"{who} has no seccomp profile (none on it or the pod)",
            )
        if sc.get("readOnlyRootFilesystem") is not True and list_name != "ephemeralContainers":
            yield Hit(
                R["AEO-K8S-038"],
                f"{scp}/readOnlyRootFilesystem" if sc else cp,
                f"{who} has a writable root filesystem",
            )
        if list_name == "ephemeralContainers":
            continue
        yield from _resources(c, cp, who)
        if list_name == "containers" and ps.kind not in BATCH_KINDS:
            if "livenessProbe" not in c:
                yield Hit(R["AEO-K8S-034"], cp, f"{who} has no livenessProbe")
            if "readinessProbe" not in c:
                yield Hit(R["AEO-K8S-035"], cp, f"{who} has no readinessProbe")
        yield from _image(c, cp, who)


def _security_fields(
    sc: Mapping[str, Any], scp: str, who: str, *, pod_level: bool
) -> Iterator[Hit]:
    """The controls that apply the same way to the pod's and a container's securityContext."""
    R = RULES
    if _get(sc, "windowsOptions", "hostProcess") is True:
        yield Hit(
            R["AEO-K8S-008"],
            f"{scp}/windowsOptions/hostProcess",
            f"{who} is a HostProcess container",
        )
    selinux = sc.get("seLinuxOptions")
    if isinstance(selinux, Mapping):
        if selinux.get("type", "") not in SELINUX_TYPES:
            yield Hit(
                R["AEO-K8S-010"],
                f"{scp}/seLinuxOptions/type",
                f"{who} sets SELinux type {selinux.get('type')!r}",
            )
        for key in ("user", "role"):
            if selinux.get(key):
                yield Hit(
                    R["AEO-K8S-010"], f"{scp}/seLinuxOptions/{key}", f"{who} sets SELinux {key}"
                )
    if not pod_level and sc.get("procMount") not in (None, "Default"):
        yield Hit(
            R["AEO-K8S-011"], f"{scp}/procMount", f"{who} sets procMount {sc.get('procMount')!r}"
        )
    if _get(sc, "seccompProfile", "type") == "Unconfined":
        yield Hit(R["AEO-K8S-012"], f"{scp}/seccompProfile/type", f"{who} runs seccomp Unconfined")
    apparmor = _get(sc, "appArmorProfile", "type")
    if apparmor is not None and apparmor not in ("RuntimeDefault", "Localhost"):
        yield Hit(
            R["AEO-K8S-009"], f"{scp}/appArmorProfile/type", f"{who} sets AppArmor {apparmor!r}"
        )


def _resources(c: Mapping[str, Any], cp: str, who: str) -> Iterator[Hit]:
    res = as_map(c.get("resources"))
    rp = f"{cp}/resources" if "resources" in c else cp
    for kind, resource, rid in (
        ("requests", "cpu", "AEO-K8S-030"),
        ("limits", "cpu", "AEO-K8S-031"),
        ("requests", "memory", "AEO-K8S-032"),
        ("limits", "memory", "AEO-K8S-033"),
    ):
        if not _get(res, kind, resource):
            yield Hit(
                RULES[rid],
                f"{rp}/{kind}" if kind in res else rp,
                f"{who} has no {resource} {kind[:-1]}",
            )


def split_image(image: str) -> tuple[str, str, str]:
    """(repository, tag, digest) of an image reference; '' for a part not given."""
    rest, _, digest = image.partition("@")
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        return rest[:colon], rest[colon + 1 :], digest
    return rest, "", digest


def _image(c: Mapping[str, Any], cp: str, who: str) -> Iterator[Hit]:
    image = c.get("image")
    if not isinstance(image, str) or not image:
        return
    _, tag, digest = split_image(image)
    if not digest and tag in ("", "latest"):
        yield Hit(
            RULES["AEO-K8S-036"],
            f"{cp}/image",
            f"{who} uses image {image!r} ({'latest' if tag else 'no tag'})",
        )
    if not digest:
        yield Hit(
            RULES["AEO-K8S-037"], f"{cp}/image", f"{who} uses image {image!r} without a digest"
        )


def _default_deny(policy: Mapping[str, Any], direction: str) -> bool:
    spec = policy.get("spec")
    if not isinstance(spec, Mapping):
        return False
    selector = spec.get("podSelector")
    if selector not in ({}, None) and (
        not isinstance(selector, Mapping)
        or selector.get("matchLabels")
        or selector.get("matchExpressions")
    ):
        return False
    types = spec.get("policyTypes")
    rules_key = direction.lower()
    if types is None:
        # Without policyTypes, Ingress is implied, Egress only when egress rules exist.
        types = ["Ingress"] + (["Egress"] if "egress" in spec else [])
    return direction in types and not spec.get(rules_key)


@dataclass(frozen=True, slots=True)
class NamespaceUse:
    """Where a namespace first appears: the object to attach a finding to."""

    namespace: str
    index: int


def check_network_policies(objects: Sequence[Mapping[str, Any]]) -> Iterator[tuple[int, Hit]]:
    """(object index, hit) for each namespace without a default-deny ingress/egress policy.

    The namespaces considered are those of Namespace objects and of
    workloads; the finding goes on the Namespace object when there is one,
    else on the first workload in it.
    """
    first: dict[str, int] = {}
    ns_object: dict[str, int] = {}
    denies: dict[str, set[str]] = {}
    for i, obj in enumerate(objects):
        kind = obj.get("kind")
        meta = as_map(obj.get("metadata"))
        if kind == "Namespace":
            name = str(meta.get("name", ""))
            ns_object.setdefault(name, i)
            first.setdefault(name, i)
        elif kind == "NetworkPolicy":
            ns = str(meta.get("namespace") or "default")
            for direction in ("Ingress", "Egress"):
                if _default_deny(obj, direction):
                    denies.setdefault(ns, set()).add(direction)
        elif kind in POD_SPEC_PATHS:
            first.setdefault(str(meta.get("namespace") or "default"), i)
    for ns, i in first.items():
        at = ns_object.get(ns, i)
        have = denies.get(ns, set())
        if "Ingress" not in have:
            yield (
                at,
                Hit(
                    RULES["AEO-K8S-039"],
                    "/metadata",
                    f"namespace {ns!r} has no default-deny ingress NetworkPolicy",
                ),
            )
        if "Egress" not in have:
            yield (
                at,
                Hit(
                    RULES["AEO-K8S-040"],
                    "/metadata",
                    f"namespace {ns!r} has no default-deny egress NetworkPolicy",
                ),
            )


# -- Terraform -------------------------------------------------------------------

OPEN_CIDRS = frozenset({"0.0.0.0/0", "::/0"})
PUBLIC_ACLS = frozenset({"public-read", "public-read-write", "authenticated-read", "website"})
PUBLIC_MEMBERS = frozenset({"allUsers", "allAuthenticatedUsers"})
#: Ports that make an internet-wide ingress critical (admin protocols).
ADMIN_PORTS = (22, 3389)


def is_plan(data: Any) -> bool:
    """Whether a JSON document is a Terraform plan (``terraform show -json``)."""
    return (
        isinstance(data, Mapping)
        and "format_version" in data
        and ("planned_values" in data or "resource_changes" in data)
    )


@dataclass(frozen=True, slots=True)
class PlannedResource:
    """One resource of a plan's planned_values, with its pointer."""

    address: str
    type: str
    provider: str
    values: Mapping[str, Any]
    pointer: str


def planned_resources(plan: Mapping[str, Any]) -> Iterator[PlannedResource]:
    """Every resource of planned_values, child modules included."""

    def walk(module: Any, pointer: str) -> Iterator[PlannedResource]:
        if not isinstance(module, Mapping):
            return
        for i, res in enumerate(module.get("resources") or []):
            if isinstance(res, Mapping) and res.get("mode", "managed") == "managed":
                values = as_map(res.get("values"))
                yield PlannedResource(
                    str(res.get("address", "")),
                    str(res.get("type", "")),
                    str(res.get("provider_name", "")),
                    values,
                    f"{pointer}/resources/{i}",
                )
        for j, child in enumerate(module.get("child_modules") or []):
            yield from walk(child, f"{pointer}/child_modules/{j}")

    yield from walk(_get(plan, "planned_values", "root_module"), "/planned_values/root_module")


def _ports(rule: Mapping[str, Any]) -> tuple[int, int]:
    lo, hi = rule.get("from_port", 0), rule.get("to_port", 65535)
    try:
        lo, hi = int(lo), int(hi)
    except (TypeError, ValueError):
        return 0, 65535
    if rule.get("protocol") in ("-1", -1, "all"):
        return 0, 65535
    return lo, hi


def _open_ingress(r: PlannedResource, rule: Mapping[str, Any], pointer: str) -> Iterator[Hit]:
    cidrs = {*(rule.get("cidr_blocks") or []), *(rule.get("ipv6_cidr_blocks") or [])}
    for key in ("cidr_ipv4", "cidr_ipv6"):
        if rule.get(key):
            cidrs.add(rule[key])
    if not cidrs & OPEN_CIDRS:
        return
    lo, hi = _ports(rule)
    what = (
        "all ports"
        if (lo, hi) == (0, 65535)
        else (f"port {lo}" if lo == hi else f"ports {lo}-{hi}")
    )
    admin = [p for p in ADMIN_PORTS if lo <= p <= hi]
    rule_ = RULES["AEO-TF-004"]
    hit = Hit(
        rule_, pointer, f"{r.address} allows ingress from {sorted(cidrs & OPEN_CIDRS)[0]} to {what}"
    )
    if admin or (lo, hi) == (0, 65535):
        hit = Hit(
            Rule(**{**_asdict(rule_), "severity": CRITICAL}),
            pointer,
            hit.message + (f" (including {', '.join(map(str, admin))})" if admin else ""),
        )
    yield hit


def _asdict(rule: Rule) -> dict[str, Any]:
    return {f: getattr(rule, f) for f in Rule.__slots__}


TfCheck = Callable[[PlannedResource], Iterator[Hit]]


def _tf_s3_bucket(r: PlannedResource) -> Iterator[Hit]:
    if r.values.get("acl") in PUBLIC_ACLS:
        yield Hit(
            RULES["AEO-TF-001"],
            f"{r.pointer}/values/acl",
            f"{r.address} has ACL {r.values['acl']!r}",
        )


def _tf_s3_acl(r: PlannedResource) -> Iterator[Hit]:
    if r.values.get("acl") in PUBLIC_ACLS:
        yield Hit(
            RULES["AEO-TF-001"],
            f"{r.pointer}/values/acl",
            f"{r.address} sets ACL {r.values['acl']!r}",
        )


def _tf_public_access_block(r: PlannedResource) -> Iterator[Hit]:
    for key in (
        "block_public_acls",
        "block_public_policy",
        "ignore_public_acls",
        "restrict_public_buckets",
    ):
        if r.values.get(key) is not True:
            yield Hit(
                RULES["AEO-TF-002"],
                f"{r.pointer}/values/{key}",
                f"{r.address} does not set {key} = true",
            )


def _tf_s3_policy(r: PlannedResource) -> Iterator[Hit]:
    import json

    raw = r.values.get("policy")
    try:
        doc = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        return
    statements = doc.get("Statement") if isinstance(doc, Mapping) else None
    if isinstance(statements, Mapping):
        statements = [statements]
    for st in statements or []:
        principal = st.get("Principal") if isinstance(st, Mapping) else None
        star = principal == "*" or (
            isinstance(principal, Mapping) and principal.get("AWS") in ("*", ["*"])
        )
        if star and st.get("Effect") == "Allow" and not st.get("Condition"):
            yield Hit(
                RULES["AEO-TF-010"],
                f"{r.pointer}/values/policy",
                f'{r.address} allows Principal "*"',
            )


def _tf_gcs_iam(r: PlannedResource) -> Iterator[Hit]:
    members = r.values.get("members") or ([r.values["member"]] if r.values.get("member") else [])
    public = sorted(set(members) & PUBLIC_MEMBERS)
    if public:
        yield Hit(
            RULES["AEO-TF-003"],
            f"{r.pointer}/values",
            f"{r.address} grants {r.values.get('role')} to {public[0]}",
        )


def _tf_security_group(r: PlannedResource) -> Iterator[Hit]:
    for i, rule in enumerate(r.values.get("ingress") or []):
        if isinstance(rule, Mapping):
            yield from _open_ingress(r, rule, f"{r.pointer}/values/ingress/{i}")


def _tf_sg_rule(r: PlannedResource) -> Iterator[Hit]:
    if r.type == "aws_security_group_rule" and r.values.get("type") != "ingress":
        return
    yield from _open_ingress(r, r.values, f"{r.pointer}/values")


def _tf_gcp_firewall(r: PlannedResource) -> Iterator[Hit]:
    if r.values.get("direction", "INGRESS") != "INGRESS" or r.values.get("disabled"):
        return
    if set(r.values.get("source_ranges") or []) & OPEN_CIDRS and r.values.get("allow"):
        yield Hit(
            RULES["AEO-TF-005"],
            f"{r.pointer}/values/source_ranges",
            f"{r.address} allows ingress from 0.0.0.0/0",
        )


def _flag(rid: str, key: str) -> TfCheck:
    def check(r: PlannedResource) -> Iterator[Hit]:
        if r.values.get(key) is not True:
            yield Hit(
                RULES[rid],
                f"{r.pointer}/values/{key}" if key in r.values else f"{r.pointer}/values",
                f"{r.address} does not set {key} = true",
            )

    return check


def _tf_azure_container(r: PlannedResource) -> Iterator[Hit]:
    access = r.values.get("container_access_type", "private")
    if access != "private":
        yield Hit(
            RULES["AEO-TF-009"],
            f"{r.pointer}/values/container_access_type",
            f"{r.address} has container_access_type {access!r}",
        )


TF_CHECKS: Mapping[str, tuple[TfCheck, ...]] = {
    "aws_s3_bucket": (_tf_s3_bucket,),
    "aws_s3_bucket_acl": (_tf_s3_acl,),
    "aws_s3_bucket_public_access_block": (_tf_public_access_block,),
    "aws_s3_bucket_policy": (_tf_s3_policy,),
    "google_storage_bucket_iam_member": (_tf_gcs_iam,),
    "google_storage_bucket_iam_binding": (_tf_gcs_iam,),
    "aws_security_group": (_tf_security_group,),
    "aws_security_group_rule": (_tf_sg_rule,),
    "aws_vpc_security_group_ingress_rule": (_tf_sg_rule,),
    "google_compute_firewall": (_tf_gcp_firewall,),
    "aws_ebs_volume": (_flag("AEO-TF-006", "encrypted"),),
    "aws_db_instance": (_flag("AEO-TF-007", "storage_encrypted"),),
    "aws_rds_cluster": (_flag("AEO-TF-007", "storage_encrypted"),),
    "aws_efs_file_system": (_flag("AEO-TF-008", "encrypted"),),
    "azurerm_storage_container": (_tf_azure_container,),
}


def check_plan(plan: Mapping[str, Any]) -> Iterator[tuple[PlannedResource, Hit]]:
    """Every Terraform rule over a plan's planned resources."""
    for r in planned_resources(plan):
        for check in TF_CHECKS.get(r.type, ()):
            for hit in check(r):
                yield r, hit
