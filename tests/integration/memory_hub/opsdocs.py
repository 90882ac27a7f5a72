"""A retrieval test set written for this project: short operations documents
(runbooks, incident notes, policies) and queries with their relevant ids.

The queries are what on-call engineers type: some quote an identifier (an
incident number, an error string, a command), some describe a symptom in
their own words. Several documents are near neighbours on purpose (three
about certificates, three about Postgres, incidents that resemble runbooks),
so a ranker has to tell them apart.
"""

from __future__ import annotations

#: (id, kind, title, text)
DOCS: list[tuple[str, str, str, str]] = [
    # -- runbooks --------------------------------------------------------------------
    (
        "rb-disk-pressure",
        "runbook",
        "Node disk pressure",
        "When a node reports DiskPressure the kubelet starts evicting pods. Check usage with df -h and "
        "du -sh /var/lib/containerd. Prune unused images with crictl rmi --prune and truncate large "
        "files under /var/log/pods.",
    ),
    (
        "rb-node-notready",
        "runbook",
        "Node NotReady",
        "A node in NotReady usually means the kubelet stopped posting status. SSH to the node, run "
        "systemctl status kubelet and journalctl -u kubelet. Restart the kubelet; if the container "
        "runtime is hung, restart containerd first.",
    ),
    (
        "rb-etcd-backup",
        "runbook",
        "etcd backups",
        "etcd is backed up every six hours with etcdctl snapshot save to the backup bucket. Verify a "
        "snapshot with etcdctl snapshot status before relying on it. Keep fourteen days of snapshots.",
    ),
    (
        "rb-etcd-restore",
        "runbook",
        "Restoring etcd",
        "To restore the control plane, stop every kube-apiserver, run etcdctl snapshot restore with a "
        "new data directory on each member, then start etcd and the API servers again. Restore all "
        "members from the same snapshot.",
    ),
    (
        "rb-etcd-defrag",
        "runbook",
        "etcd database size",
        "If etcd raises the alarm NOSPACE the database has hit its quota. Compact the revision history, "
        "run etcdctl defrag on one member at a time, then clear the alarm with etcdctl alarm disarm.",
    ),
    (
        "rb-cert-manager",
        "runbook",
        "Renewing ingress certificates",
        "cert-manager renews ingress TLS certificates thirty days before they expire. If a Certificate "
        "is stuck, describe the CertificateRequest and the ACME Order; a failed HTTP-01 challenge usually "
        "means the ingress class annotation is wrong.",
    ),
    (
        "rb-mtls-istio",
        "runbook",
        "Service mesh mTLS",
        "Workload certificates for mutual TLS are issued by istiod and rotate every 24 hours. If "
        "sidecars log x509 certificate signed by unknown authority, the root CA was rotated without "
        "restarting the workloads; roll the deployments.",
    ),
    (
        "rb-ingress-502",
        "runbook",
        "Ingress returns 502",
        "A 502 Bad Gateway from the NGINX ingress means the upstream pod closed the connection or is "
        "not ready. Check the endpoints of the service, the readiness probe, and keep-alive timeouts "
        "that are shorter on the upstream than on the ingress.",
    ),
    (
        "rb-coredns",
        "runbook",
        "DNS resolution failures",
        "If pods cannot resolve names, check the CoreDNS pods and their logs. SERVFAIL answers usually "
        "come from an unreachable upstream resolver. Scale CoreDNS up and enable NodeLocal DNSCache to "
        "cut lookups that leave the node.",
    ),
    (
        "rb-oomkilled",
        "runbook",
        "Pods OOMKilled",
        "A container terminated with reason OOMKilled exceeded its memory limit. Compare the limit with "
        "the working set in the dashboards, raise the limit or fix the leak, and set requests equal to "
        "limits for latency-critical services.",
    ),
    (
        "rb-crashloop",
        "runbook",
        "CrashLoopBackOff",
        "CrashLoopBackOff means the container keeps exiting. Read the previous logs with kubectl logs "
        "--previous, check the exit code, and look for a missing config map or secret mounted at start.",
    ),
    (
        "rb-imagepull",
        "runbook",
        "ImagePullBackOff",
        "ImagePullBackOff with 401 Unauthorized means the registry credentials are missing or expired. "
        "Recreate the docker-registry secret and reference it in imagePullSecrets of the service account.",
    ),
    (
        "rb-pvc-terminating",
        "runbook",
        "PVC stuck in Terminating",
        "A PersistentVolumeClaim stays Terminating while a pod still mounts it or a finalizer such as "
        "kubernetes.io/pvc-protection is set. Delete the pod first; remove the finalizer only when the "
        "volume is really unused.",
    ),
    (
        "rb-hpa",
        "runbook",
        "Autoscaler does not scale",
        "If the HorizontalPodAutoscaler shows unknown targets, metrics-server is not serving resource "
        "metrics. Check the metrics-server deployment and the APIService v1beta1.metrics.k8s.io.",
    ),
    (
        "rb-kafka-lag",
        "runbook",
        "Kafka consumer lag",
        "Growing consumer lag on a Kafka topic means consumers process slower than producers write. "
        "Check partition count against consumer replicas, look for rebalances in the consumer logs, and "
        "scale the consumer group.",
    ),
    (
        "rb-redis-memory",
        "runbook",
        "Redis evicting keys",
        "When Redis reaches maxmemory it evicts keys according to maxmemory-policy. For caches use "
        "allkeys-lru; for queues and locks use noeviction and alert on used_memory above 80 percent.",
    ),
    (
        "rb-pg-replication",
        "runbook",
        "Postgres replication lag",
        "Replication lag on a Postgres standby shows in pg_stat_replication as replay_lag. Long running "
        "queries on the standby and slow disks are the usual causes; hot_standby_feedback trades lag "
        "for bloat on the primary.",
    ),
    (
        "rb-pg-connections",
        "runbook",
        "Postgres too many connections",
        "FATAL: sorry, too many clients already means max_connections is exhausted. Route applications "
        "through PgBouncer in transaction pooling mode instead of raising max_connections.",
    ),
    (
        "rb-pg-failover",
        "runbook",
        "Postgres failover",
        "Patroni promotes a standby when the primary loses its leader key. After a failover, check that "
        "the old primary rejoined as a replica with pg_rewind and that the application reconnected.",
    ),
    (
        "rb-vault-unseal",
        "runbook",
        "Vault sealed",
        "After a restart Vault starts sealed. With auto-unseal the KMS key must be reachable; with "
        "Shamir keys, three of five key holders run vault operator unseal.",
    ),
    (
        "rb-argocd-drift",
        "runbook",
        "Argo CD OutOfSync",
        "An application that stays OutOfSync has drifted from Git. Compare the live and desired "
        "manifests in the diff view; manual kubectl edits are reverted by self-heal.",
    ),
    (
        "rb-helm-rollback",
        "runbook",
        "Rolling back a release",
        "Roll back a bad Helm release with helm rollback RELEASE REVISION; helm history lists the "
        "revisions. Prefer reverting the Git commit when the release is managed by Argo CD.",
    ),
    (
        "rb-node-patching",
        "runbook",
        "Kernel patching",
        "Patch nodes one at a time: kubectl cordon, kubectl drain --ignore-daemonsets "
        "--delete-emptydir-data, apply the kernel update, reboot, then uncordon. PodDisruptionBudgets "
        "keep enough replicas serving.",
    ),
    (
        "rb-clock-skew",
        "runbook",
        "Clock skew",
        "Tokens fail validation and etcd logs clock difference warnings when node clocks drift. Check "
        "chronyc tracking on each node and make sure the NTP servers are reachable.",
    ),
    (
        "rb-fluentbit",
        "runbook",
        "Log shipping backpressure",
        "Fluent Bit pauses inputs when its output buffer fills, and logs are then missing in the log "
        "store. Enable filesystem buffering and raise Mem_Buf_Limit for busy nodes.",
    ),
    (
        "rb-prom-cardinality",
        "runbook",
        "Prometheus memory",
        "Prometheus memory grows with the number of active series. Find high cardinality metrics with "
        "the TSDB status page and drop labels such as user_id or request path with relabeling.",
    ),
    # -- incidents -------------------------------------------------------------------
    (
        "inc-2041",
        "incident",
        "INC-2041 expired certificate on the API gateway",
        "On 2 March the public API gateway served an expired TLS certificate for 47 minutes. The "
        "cert-manager Certificate had been deleted during a namespace migration, so nothing renewed "
        "it. Action: alert on certificates expiring within 14 days.",
    ),
    (
        "inc-2077",
        "incident",
        "INC-2077 payment API 502s",
        "Between 14:02 and 14:40 the payment API returned 502 errors to 8 percent of requests. The "
        "upstream keep-alive timeout was 5 seconds while the ingress kept connections for 60 seconds.",
    ),
    (
        "inc-2093",
        "incident",
        "INC-2093 DNS outage",
        "CoreDNS pods were OOMKilled after a spike of NXDOMAIN queries from a misconfigured search path, "
        "and cluster DNS failed for 18 minutes. The memory limit was raised and ndots lowered to 2.",
    ),
    (
        "inc-2110",
        "incident",
        "INC-2110 etcd quota",
        "The control plane became read-only when etcd hit its space quota and raised NOSPACE. A "
        "controller was writing an event every second. Defragmentation and an event TTL fixed it.",
    ),
    (
        "inc-2128",
        "incident",
        "INC-2128 checkout latency",
        "Checkout latency rose to 4 seconds because PgBouncer ran out of server connections after a "
        "deploy doubled the application replicas. The pool size was raised from 20 to 40.",
    ),
    (
        "inc-2135",
        "incident",
        "INC-2135 lost logs",
        "Logs from the batch nodes were missing for six hours. Fluent Bit had paused its tail input "
        "because the output to the log store was throttled and the memory buffer was full.",
    ),
    (
        "inc-2150",
        "incident",
        "INC-2150 Kafka rebalance storm",
        "Order events were delayed by 25 minutes because consumers kept rebalancing. max.poll.interval.ms "
        "was shorter than the slowest batch, so the broker kicked consumers out of the group.",
    ),
    (
        "inc-2162",
        "incident",
        "INC-2162 registry credentials",
        "New pods in the analytics namespace could not start for two hours: the pull secret for the "
        "private registry had expired and image pulls failed with 401 Unauthorized.",
    ),
    (
        "inc-2171",
        "incident",
        "INC-2171 Vault sealed after maintenance",
        "After a KMS key policy change, Vault could not auto-unseal on restart and secrets injection "
        "failed for new pods. The key policy was restored and Vault unsealed itself.",
    ),
    (
        "inc-2188",
        "incident",
        "INC-2188 replica lag",
        "Reports showed stale data because the reporting standby lagged 3 hours behind the primary. "
        "A nightly analytics query held back replay; it now runs on a dedicated replica.",
    ),
    (
        "inc-2203",
        "incident",
        "INC-2203 Redis evictions",
        "Session keys were evicted from the shared Redis, logging users out. The instance ran "
        "allkeys-lru and a new cache filled memory. Sessions moved to their own instance with noeviction.",
    ),
    (
        "inc-2219",
        "incident",
        "INC-2219 drain blocked",
        "Kernel patching stalled for a day because a PodDisruptionBudget allowed zero disruptions for a "
        "single-replica service, so kubectl drain waited forever.",
    ),
    (
        "inc-2230",
        "incident",
        "INC-2230 clock drift",
        "Authentication failed intermittently with token used before issued errors. Two nodes had lost "
        "their NTP servers after a firewall change and drifted by 90 seconds.",
    ),
    (
        "inc-2244",
        "incident",
        "INC-2244 Prometheus crash",
        "Prometheus was OOMKilled repeatedly after a service added a request_id label to a histogram, "
        "creating millions of series. The label was dropped by a relabel rule.",
    ),
    (
        "inc-2251",
        "incident",
        "INC-2251 mesh certificates",
        "Calls between services failed with certificate signed by unknown authority after the mesh root "
        "CA was rotated. Workloads that had not restarted still trusted the old root.",
    ),
    (
        "inc-2266",
        "incident",
        "INC-2266 PVC delete hang",
        "A namespace deletion hung for hours because PVCs kept the pvc-protection finalizer while a "
        "CronJob pod still mounted them.",
    ),
    (
        "inc-2279",
        "incident",
        "INC-2279 GitOps drift",
        "A hotfix applied with kubectl edit was silently reverted by Argo CD self-heal ten minutes "
        "later, bringing the bug back. Hotfixes must go through Git.",
    ),
    (
        "inc-2290",
        "incident",
        "INC-2290 autoscaling stuck",
        "During the sale the web tier did not scale out because metrics-server was crash looping after "
        "a certificate change, leaving the HPA with unknown metrics.",
    ),
    (
        "inc-2301",
        "incident",
        "INC-2301 failover",
        "The primary database node lost power and Patroni promoted a standby within 30 seconds. The "
        "application kept stale connections until its pool was recycled, so writes failed for 6 minutes.",
    ),
    (
        "inc-2315",
        "incident",
        "INC-2315 node disk full",
        "Three nodes ran out of disk because a debug image of 14 GB was pulled by a DaemonSet. "
        "The kubelet evicted pods until images were pruned.",
    ),
    # -- policies --------------------------------------------------------------------
    (
        "pol-oncall",
        "policy",
        "On-call policy",
        "Every service has a primary and a secondary on-call engineer. Pages must be acknowledged "
        "within 5 minutes. Hand-over happens on Mondays at 10:00 with a written summary.",
    ),
    (
        "pol-severity",
        "policy",
        "Incident severity levels",
        "SEV1: customer-facing outage or data loss, all hands. SEV2: major degradation, incident "
        "commander assigned. SEV3: minor impact, handled in business hours. SEV4: no impact.",
    ),
    (
        "pol-postmortem",
        "policy",
        "Postmortem policy",
        "Every SEV1 and SEV2 incident gets a blameless postmortem within five working days, with a "
        "timeline, root cause and action items with owners.",
    ),
    (
        "pol-change-freeze",
        "policy",
        "Change freeze",
        "No production changes during the freeze from 20 December to 3 January and in the week before "
        "a major sale, except emergency fixes approved by the incident commander.",
    ),
    (
        "pol-change-approval",
        "policy",
        "Change approval",
        "Production changes need a merged pull request reviewed by two engineers, one of them from the "
        "owning team. Infrastructure changes also need a plan output attached.",
    ),
    (
        "pol-access-review",
        "policy",
        "Access reviews",
        "Managers review production access every quarter. Access unused for 90 days is revoked "
        "automatically. Break-glass accounts are audited after every use.",
    ),
    (
        "pol-secret-rotation",
        "policy",
        "Secret rotation",
        "Database passwords and API keys rotate every 90 days, and at once when someone with access "
        "leaves. Secrets live in Vault; never in Git or in container images.",
    ),
    (
        "pol-retention",
        "policy",
        "Data retention",
        "Application logs are kept for 30 days, audit logs for 400 days, and metrics for 13 months. "
        "Personal data in logs must be masked before it is stored.",
    ),
    (
        "pol-backup",
        "policy",
        "Backups",
        "Production databases have an RPO of 15 minutes and an RTO of 4 hours. Restores are tested "
        "every month on a copy; an untested backup does not count.",
    ),
    (
        "pol-image-signing",
        "policy",
        "Image signing",
        "Only images signed with cosign by the release pipeline may run in production. Kyverno "
        "verifies signatures at admission and rejects unsigned images.",
    ),
    (
        "pol-network",
        "policy",
        "Network policy",
        "Every namespace starts with default-deny ingress and egress NetworkPolicies. Allowed flows, DNS "
        "included, are declared next to the service that needs them.",
    ),
    (
        "pol-least-privilege",
        "policy",
        "Least privilege",
        "Service accounts get only the RBAC permissions they use. Cluster-admin is reserved for "
        "break-glass; humans get namespace-scoped roles.",
    ),
    (
        "pol-encryption",
        "policy",
        "Encryption",
        "Data at rest is encrypted with keys in the cloud KMS, and Kubernetes secrets are encrypted in "
        "etcd with an envelope encryption provider. TLS 1.2 or newer everywhere in transit.",
    ),
    (
        "pol-vuln-sla",
        "policy",
        "Vulnerability patching",
        "Critical vulnerabilities are patched within 7 days, high within 30 days, medium within 90 "
        "days. Exceptions need a risk acceptance signed by the security lead.",
    ),
]

#: (query, relevant document ids)
QUERIES: list[tuple[str, list[str]]] = [
    ("INC-2041", ["inc-2041"]),
    ("what happened in INC-2128", ["inc-2128"]),
    ("etcdctl snapshot restore", ["rb-etcd-restore"]),
    ("etcd NOSPACE alarm", ["rb-etcd-defrag", "inc-2110"]),
    ("FATAL: sorry, too many clients already", ["rb-pg-connections"]),
    ("x509 certificate signed by unknown authority", ["rb-mtls-istio", "inc-2251"]),
    ("ImagePullBackOff 401 Unauthorized", ["rb-imagepull", "inc-2162"]),
    ("kubectl logs --previous", ["rb-crashloop"]),
    ("max.poll.interval.ms rebalance", ["inc-2150"]),
    ("allkeys-lru or noeviction", ["rb-redis-memory", "inc-2203"]),
    ("pg_stat_replication replay_lag", ["rb-pg-replication"]),
    ("Mem_Buf_Limit", ["rb-fluentbit"]),
    ("chronyc tracking", ["rb-clock-skew"]),
    ("SEV2 definition", ["pol-severity"]),
    ("cosign Kyverno", ["pol-image-signing"]),
    ("the website is down because the certificate expired", ["inc-2041", "rb-cert-manager"]),
    (
        "pods keep getting killed for using too much memory",
        ["rb-oomkilled", "inc-2093", "inc-2244"],
    ),
    ("how do I get a node back when it is not ready", ["rb-node-notready"]),
    ("names do not resolve inside the cluster", ["rb-coredns", "inc-2093"]),
    ("how long do we keep audit logs", ["pol-retention"]),
    ("who has to approve a production change", ["pol-change-approval"]),
    ("can we deploy during the holidays", ["pol-change-freeze"]),
    ("how often must database passwords be changed", ["pol-secret-rotation"]),
    ("the database standby is hours behind", ["rb-pg-replication", "inc-2188"]),
    ("a volume claim never finishes deleting", ["rb-pvc-terminating", "inc-2266"]),
    ("my manual fix in the cluster disappeared", ["rb-argocd-drift", "inc-2279"]),
    ("the autoscaler is not adding pods", ["rb-hpa", "inc-2290"]),
    ("node runs out of disk space", ["rb-disk-pressure", "inc-2315"]),
    ("how fast must a critical CVE be fixed", ["pol-vuln-sla"]),
    ("secrets cannot be injected because Vault is sealed", ["rb-vault-unseal", "inc-2171"]),
]
