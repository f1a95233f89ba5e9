{{/* The chart name, or nameOverride. */}}
{{- define "meridian-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every object name: fullnameOverride, else release-chart (once). */}}
{{- define "meridian-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Labels on every object. */}}
{{/*
Where the conversion webhook's certificate comes from: "self-signed" or "cert-manager".
*/}}
{{- define "meridian-operator.webhookCertificates" -}}
{{- $mode := .Values.webhook.certificates -}}
{{- if eq $mode "auto" -}}
{{- ternary "cert-manager" "self-signed" (.Capabilities.APIVersions.Has "cert-manager.io/v1") -}}
{{- else -}}
{{- $mode -}}
{{- end -}}
{{- end }}

{{- define "meridian-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "meridian-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: meridian
{{- end }}

{{/* Labels that select the operator's pods. */}}
{{- define "meridian-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "meridian-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The ServiceAccount the operator runs as. */}}
{{- define "meridian-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "meridian-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag, the tag defaulting to the chart's appVersion. */}}
{{- define "meridian-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The namespace of the dashboards' ConfigMaps. */}}
{{- define "meridian-operator.dashboardNamespace" -}}
{{- default .Release.Namespace .Values.dashboards.namespace }}
{{- end }}
