{{/* Names and labels shared by the templates. */}}
{{- define "autojudge.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "autojudge.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "autojudge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "autojudge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "autojudge.labels" -}}
{{ include "autojudge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The pod's grace period: the drain, then the in-flight requests, then 10 s for the process to exit. */}}
{{- define "autojudge.terminationGrace" -}}
{{- add (int .Values.server.drainGrace) (int .Values.server.shutdownTimeout) 10 -}}
{{- end -}}
