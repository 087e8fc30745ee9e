{{- define "tollgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tollgate.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "tollgate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "tollgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* selector labels: (dict "ctx" $ "component" "gateway") */}}
{{- define "tollgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tollgate.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "tollgate.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "tollgate.secretName" -}}
{{- default (printf "%s-secrets" (include "tollgate.fullname" .)) .Values.secrets.existingSecret -}}
{{- end -}}

{{/* gateway replicas that may run at once: the HPA's maximum, else the fixed count */}}
{{- define "tollgate.gatewayExpectedReplicas" -}}
{{- if .Values.gateway.autoscaling.enabled -}}
{{- .Values.gateway.autoscaling.maxReplicas | int -}}
{{- else -}}
{{- .Values.gateway.replicas | int -}}
{{- end -}}
{{- end -}}

{{- define "tollgate.terminationGracePeriod" -}}
{{- $d := .Values.gateway.drain -}}
{{- add ($d.preStopSleepSeconds | int) ($d.gracePeriodSeconds | int) ($d.gracefulShutdownTimeoutSeconds | int) 5 -}}
{{- end -}}

{{/*
A TOML document from a map: scalars first, then tables (recursively). Values from YAML are
float64: whole numbers are written as integers, except the keys in floatKeys.
(dict "map" $m "prefix" "" "floatKeys" (list ...))
*/}}
{{- define "tollgate.toml" -}}
{{- $m := .map -}}
{{- $floatKeys := .floatKeys -}}
{{- range $k := keys $m | sortAlpha }}
{{- $v := get $m $k }}
{{- if not (kindIs "map" $v) }}
{{- if kindIs "string" $v }}
{{ $k }} = {{ toJson $v }}
{{- else if kindIs "bool" $v }}
{{ $k }} = {{ $v }}
{{- else if kindIs "slice" $v }}
{{ $k }} = {{ toJson $v }}
{{- else if has $k $floatKeys }}
{{- $s := printf "%v" $v }}
{{ $k }} = {{ if contains "." $s }}{{ $s }}{{ else }}{{ $s }}.0{{ end }}
{{- else }}
{{ $k }} = {{ $v | int64 }}
{{- end }}
{{- end }}
{{- end }}
{{- range $k := keys $m | sortAlpha }}
{{- $v := get $m $k }}
{{- if kindIs "map" $v }}
{{- $name := ternary $k (printf "%s.%s" $.prefix $k) (eq $.prefix "") }}

[{{ $name }}]
{{- include "tollgate.toml" (dict "map" $v "prefix" $name "floatKeys" $floatKeys) }}
{{- end }}
{{- end }}
{{- end -}}

{{/* env from the Secret: (dict "ctx" $ "name" "TOLLGATE_X" "key" "x" "optional" true) */}}
{{- define "tollgate.secretEnv" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ include "tollgate.secretName" .ctx }}
      key: {{ .key }}
      {{- if .optional }}
      optional: true
      {{- end }}
{{- end -}}

{{- define "tollgate.topologySpread" -}}
{{- $g := .Values.gateway -}}
{{- if $g.topologySpreadConstraints }}
{{- toYaml $g.topologySpreadConstraints }}
{{- else if $g.topologySpread.enabled }}
{{- range $key := list "kubernetes.io/hostname" "topology.kubernetes.io/zone" }}
- maxSkew: {{ $g.topologySpread.maxSkew }}
  topologyKey: {{ $key }}
  whenUnsatisfiable: ScheduleAnyway
  labelSelector:
    matchLabels:
      {{- include "tollgate.selectorLabels" (dict "ctx" $ "component" "gateway") | nindent 6 }}
{{- end }}
{{- end }}
{{- end -}}
