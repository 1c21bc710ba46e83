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

{{/* The routing config exactly as it goes into the ConfigMap: .Values.routing,
with `cluster: true` in its redis section when redis.cluster is on. */}}
{{- define "fallback-proxy.routingConfig" -}}
{{- $routing := deepCopy .Values.routing }}
{{- if .Values.redis.cluster }}
{{- $redis := deepCopy (default dict (get $routing "redis")) }}
{{- $_ := set $redis "cluster" true }}
{{- $_ := set $routing "redis" $redis }}
{{- end }}
{{- toYaml $routing }}
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

{{/* The most proxy processes there may be: pods (the HPA's maximum) times workers per pod. */}}
{{- define "fallback-proxy.maxProcesses" -}}
{{- $pods := ternary (.Values.autoscaling.maxReplicas | int) (.Values.replicaCount | int) (.Values.autoscaling.enabled | default false) }}
{{- $workers := get (default dict .Values.routing.server) "workers" | default 1 | int }}
{{- mul $pods $workers }}
{{- end }}

{{/* Why the pods share state in Redis, or "" when nothing says they do. */}}
{{- define "fallback-proxy.sharedStateSource" -}}
{{- $routingUrl := get (default dict .Values.routing.redis) "url" | default "" | toString }}
{{- if .Values.redis.enabled }}in-chart Redis
{{- else if .Values.redis.url }}redis.url
{{- else if .Values.redis.urlInSecret }}REDIS_URL in the Secret
{{- else if and (not .Values.existingSecret) (get (default dict .Values.secrets) "REDIS_URL") }}secrets.REDIS_URL
{{- else if and $routingUrl (not (hasPrefix "${REDIS_URL" $routingUrl)) }}routing.redis.url
{{- end }}
{{- end }}

{{/* Refuse values that would deploy something that cannot work as configured. */}}
{{- define "fallback-proxy.validate" -}}
{{- $processes := include "fallback-proxy.maxProcesses" . | int }}
{{- if and (gt $processes 1) (not (include "fallback-proxy.sharedStateSource" .)) (not .Values.allowPerPodState) }}
{{- $what := printf "routing.server.workers %d" $processes }}
{{- $who := "worker" }}
{{- if .Values.autoscaling.enabled }}
{{- $what = printf "autoscaling (up to %d pods)" (.Values.autoscaling.maxReplicas | int) }}
{{- $who = "pod" }}
{{- else if gt (.Values.replicaCount | int) 1 }}
{{- $what = printf "replicaCount %d" (.Values.replicaCount | int) }}
{{- $who = "pod" }}
{{- end }}
{{- fail (printf "%s and no Redis: each %s would enforce quotas and limits on its own (its own health state, breakers, daily quota counters and client rate limits: a daily quota of 1000 would admit 1000 per %s). Set redis.url (an external Redis, Sentinel or Cluster), redis.urlInSecret=true (existingSecret holds REDIS_URL), secrets.REDIS_URL, or redis.enabled=true (a small in-chart Redis); or allowPerPodState=true to accept per-%s state." $what $who $who $who) }}
{{- end }}
{{- if and .Values.redis.cluster .Values.redis.enabled }}
{{- fail "redis.cluster needs a Redis Cluster: the in-chart Redis (redis.enabled) is a single node. Point redis.url (or REDIS_URL) at the cluster's seed nodes." }}
{{- end }}
{{- if and .Values.redis.cluster (hasPrefix "redis+sentinel" (.Values.redis.url | toString)) }}
{{- fail "redis.cluster and a redis+sentinel:// URL: Sentinel watches a single master, a cluster has none. Use one or the other." }}
{{- end }}
{{- if and .Values.httpRoute.enabled (not .Values.httpRoute.parentRefs) }}
{{- fail "httpRoute.enabled needs httpRoute.parentRefs: the Gateway (and listener) the route attaches to." }}
{{- end }}
{{- if and .Values.ingress.enabled (not .Values.ingress.hosts) }}
{{- fail "ingress.enabled needs at least one entry in ingress.hosts." }}
{{- end }}
{{- end }}

{{/* topologySpreadConstraints, templated, each given the proxy pods' selector when it names none. */}}
{{- define "fallback-proxy.topologySpreadConstraints" -}}
{{- $selector := include "fallback-proxy.selectorLabels" . | fromYaml }}
{{- $constraints := list }}
{{- range (tpl (toYaml .Values.topologySpreadConstraints) . | fromYamlArray) }}
{{- if not (hasKey . "labelSelector") }}
{{- $_ := set . "labelSelector" (dict "matchLabels" $selector) }}
{{- end }}
{{- $constraints = append $constraints . }}
{{- end }}
{{- toYaml $constraints }}
{{- end }}
