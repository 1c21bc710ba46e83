{{/* Chart name, truncated to the 63 characters a label allows. */}}
{{- define "fallback-proxy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart, unless the release name already contains the chart name. */}}
{{- define "fallback-proxy.fullname" -}}
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

{{- define "fallback-proxy.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "fallback-proxy.labels" -}}
helm.sh/chart: {{ include "fallback-proxy.chart" . }}
app.kubernetes.io/name: {{ include "fallback-proxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fallback-proxy
{{- end }}

{{/* Selector of the proxy pods (the component keeps the in-chart Redis out). */}}
{{- define "fallback-proxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fallback-proxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: proxy
{{- end }}

{{- define "fallback-proxy.redis.fullname" -}}
{{- printf "%s-redis" (include "fallback-proxy.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fallback-proxy.redis.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fallback-proxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: redis
{{- end }}

{{- define "fallback-proxy.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "fallback-proxy.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret the provider keys come from: the user's, or the chart's. */}}
{{- define "fallback-proxy.secretName" -}}
{{- default (include "fallback-proxy.fullname" .) .Values.existingSecret }}
{{- end }}

{{/* The routing config exactly as it goes into the ConfigMap. */}}
{{- define "fallback-proxy.routingConfig" -}}
{{- toYaml .Values.routing }}
{{- end }}

{{/* REDIS_URL for the pods: the in-chart Redis, redis.url, or "" (then the Secret's, if any). */}}
{{- define "fallback-proxy.redisUrl" -}}
{{- if .Values.redis.enabled }}
{{- printf "redis://%s:6379/0" (include "fallback-proxy.redis.fullname" .) }}
{{- else }}
{{- .Values.redis.url }}
{{- end }}
{{- end }}

{{/* The app's drain time: routing.server.shutdown_grace_seconds, else shutdownGraceSeconds. */}}
{{- define "fallback-proxy.shutdownGrace" -}}
{{- $server := default dict .Values.routing.server }}
{{- if hasKey $server "shutdown_grace_seconds" }}
{{- $server.shutdown_grace_seconds | int }}
{{- else }}
{{- .Values.shutdownGraceSeconds | int }}
{{- end }}
{{- end }}

{{/* Pod termination grace: must outlast the preStop pause plus the app's drain. */}}
{{- define "fallback-proxy.terminationGrace" -}}
{{- $needed := add (.Values.preStopSleepSeconds | int) (include "fallback-proxy.shutdownGrace" . | int) }}
{{- if .Values.terminationGracePeriodSeconds }}
{{- $grace := .Values.terminationGracePeriodSeconds | int }}
{{- if le $grace $needed }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed preStopSleepSeconds + the shutdown grace (%d)" $grace $needed) }}
{{- end }}
{{- $grace }}
{{- else }}
{{- add $needed 5 }}
{{- end }}
{{- end }}

{{/* The fewest proxy pods there will be. */}}
{{- define "fallback-proxy.minReplicas" -}}
{{- if .Values.autoscaling.enabled }}
{{- .Values.autoscaling.minReplicas | int }}
{{- else }}
{{- .Values.replicaCount | int }}
{{- end }}
{{- end }}
