{{/* Namespace of a service: the core namespace for kernel services, its own for a platform. */}}
{{- define "autoecoops.namespace" -}}
{{- $root := index . 0 -}}{{- $name := index . 1 -}}{{- $svc := index $root.Values.services $name -}}
{{- if eq $svc.tier "platform" -}}{{ index $root.Values.namespaces.platforms $name }}{{- else -}}{{ $root.Values.namespaces.core }}{{- end -}}
{{- end -}}

{{- define "autoecoops.image" -}}
{{- if .Values.image.digest -}}{{ .Values.image.repository }}@{{ .Values.image.digest }}{{- else -}}{{ .Values.image.repository }}:{{ .Values.image.tag }}{{- end -}}
{{- end -}}

{{- define "autoecoops.labels" -}}
app.kubernetes.io/part-of: autoecoops
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{/* The hardened security context every container runs with (Pod Security "restricted"). */}}
{{- define "autoecoops.containerSecurity" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 10001
  runAsGroup: 10001
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: ["ALL"]
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{/* AUTOECOOPS_<SERVICE>_ADDR for every service: how the others reach it. */}}
{{- define "autoecoops.addrEnv" -}}
{{- $root := . -}}
{{- range $name, $svc := .Values.services }}
- name: AUTOECOOPS_{{ $name | upper | replace "-" "_" }}_ADDR
  value: "{{ $name }}.{{ include "autoecoops.namespace" (list $root $name) }}.svc:{{ $svc.port }}"
{{- end }}
{{- end -}}

{{/* The image pull policy: the value if set, else Always for a tag and IfNotPresent for a digest. */}}
{{- define "autoecoops.pullPolicy" -}}
{{- if .Values.image.pullPolicy -}}{{ .Values.image.pullPolicy }}{{- else if .Values.image.digest -}}IfNotPresent{{- else -}}Always{{- end -}}
{{- end -}}

{{/*
Checkov's skip annotations for a Deployment, one per check that cannot apply
to it, each with its reason (`helm template` the chart and run Checkov on it:
docs/scale.md, "Kubernetes"). Arguments: the root context and a dict with
`kubeApi` (the pod talks to the Kubernetes API). Secrets are mounted as files
(`<NAME>_FILE`, kernel/mesh/config.py read_secret), so CKV_K8S_35 holds.
*/}}
{{- define "autoecoops.checkovSkips" -}}
{{- $root := index . 0 -}}{{- $opts := index . 1 -}}
{{- $skips := list -}}
{{- if not $root.Values.image.digest -}}
{{- $skips = append $skips "CKV_K8S_43=The chart takes a tag from values; Kyverno's verify-image-signatures policy resolves it to its signed digest at admission (mutateDigest), so what runs is pinned. Set image.digest to pin it in Git too." -}}
{{- end -}}
{{- if $opts.kubeApi -}}
{{- $skips = append $skips "CKV_K8S_38=infra-manager deploys through the Kubernetes API with this token; its RBAC (templates/infra-manager-rbac.yaml) limits it to the kinds and namespaces it manages." -}}
{{- end -}}
{{- if $skips -}}
annotations:
{{- range $i, $skip := $skips }}
  checkov.io/skip{{ add1 $i }}: {{ $skip | quote }}
{{- end }}
{{- end -}}
{{- end -}}


{{/*
A PodDisruptionBudget's limit for a workload of N replicas (the argument): a
quorum stays up through voluntary disruptions, a majority of the replicas
(2 of 3, 3 of 4 or 5...), yet a drain can always evict one pod. A majority of
two is two, which would allow no eviction at all (kubectl drain would hang),
so two replicas keep one (the workloads are stateless; what must run once
runs under a lease), and one replica may be taken.
*/}}
{{- define "autoecoops.disruptionBudget" -}}
{{- $replicas := int . -}}
{{- if gt $replicas 2 -}}
minAvailable: {{ add1 (div $replicas 2) }}
{{- else if eq $replicas 2 -}}
minAvailable: 1
{{- else -}}
maxUnavailable: 1
{{- end -}}
{{- end -}}
