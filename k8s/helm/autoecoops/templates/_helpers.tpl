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
