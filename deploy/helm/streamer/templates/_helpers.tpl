{{/*
Names, labels, the sizes computed from values, and the checks that make rendering fail.
Every number that the service also computes (shared memory, max.message.bytes) is computed
here from the same values that go into the service's environment, so the two cannot disagree.
*/}}

{{- define "streamer.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "streamer.fullname" -}}
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

{{- define "streamer.selectorLabels" -}}
app.kubernetes.io/name: {{ include "streamer.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "streamer.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "streamer.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "streamer.workloadKind" -}}
{{- if .Values.staticMembership.enabled }}StatefulSet{{ else }}Deployment{{ end }}
{{- end }}

{{/* The slot pool's bound, max_in_flight × (max_payload_bytes + 3×224×224), plus the margin. */}}
{{- define "streamer.sharedMemoryBytes" -}}
{{- $slot := add (int64 .Values.maxPayloadBytes) 150528 }}
{{- add (mul (int64 .Values.maxInFlight) $slot) (int64 .Values.sharedMemory.marginBytes) }}
{{- end }}

{{/* Settings.max_message_bytes: a payload at its limit plus 64 KiB of headers, at least 1 MiB. */}}
{{- define "streamer.maxMessageBytes" -}}
{{- max (add (int64 .Values.maxPayloadBytes) 65536) 1048576 }}
{{- end }}

{{/* KEDA's target lag per replica: records one pod clears within the latency budget. */}}
{{- define "streamer.lagThreshold" -}}
{{- mulf .Values.autoscaling.perInstanceRate .Values.autoscaling.latencyBudgetSeconds | floor | int64 }}
{{- end }}

{{- define "streamer.saslEnabled" -}}
{{- if .Values.kafka.sasl.mechanism }}true{{ end }}
{{- end }}

{{- define "streamer.saslSecretName" -}}
{{- default (printf "%s-kafka-sasl" (include "streamer.fullname" .)) .Values.kafka.sasl.existingSecret }}
{{- end }}

{{- define "streamer.tlsEnabled" -}}
{{- if has .Values.kafka.securityProtocol (list "SSL" "SASL_SSL") }}true{{ end }}
{{- end }}

{{/* Settings the chart writes itself; `settings` may not set them a second time. */}}
{{- define "streamer.ownedSettings" -}}
{{- list "bootstrap_servers" "input_topic" "output_topic" "dlq_topic" "group_id" "group_instance_id"
    "session_timeout_ms" "security_protocol" "sasl_mechanism" "sasl_username" "sasl_password"
    "sasl_password_file" "ssl_cafile" "ssl_certfile" "ssl_keyfile" "device" "delivery"
    "max_in_flight" "max_payload_bytes" "max_batch_size" "decode_workers" "inference_threads"
    "cpu_inference_workers"
    "drain_timeout_s" "metrics_host" "metrics_port" "log_format" "log_level" | toJson }}
{{- end }}

{{/* Refuse values that would deploy something broken; included by the workload template. */}}
{{- define "streamer.validate" -}}
{{- $partitions := int64 .Values.topics.input.partitions }}
{{- if .Values.autoscaling.enabled }}
{{- if gt (int64 .Values.autoscaling.maxReplicas) $partitions }}
{{- fail (printf "autoscaling.maxReplicas (%d) exceeds topics.input.partitions (%d): replicas beyond the partition count would sit idle in the group" (int64 .Values.autoscaling.maxReplicas) $partitions) }}
{{- end }}
{{- if gt (int64 .Values.autoscaling.minReplicas) (int64 .Values.autoscaling.maxReplicas) }}
{{- fail "autoscaling.minReplicas exceeds autoscaling.maxReplicas" }}
{{- end }}
{{- if lt (int64 (include "streamer.lagThreshold" .)) 1 }}
{{- fail "autoscaling.perInstanceRate × autoscaling.latencyBudgetSeconds must be at least 1 record" }}
{{- end }}
{{- else if gt (int64 .Values.replicaCount) $partitions }}
{{- fail (printf "replicaCount (%d) exceeds topics.input.partitions (%d): replicas beyond the partition count would sit idle in the group" (int64 .Values.replicaCount) $partitions) }}
{{- end }}
{{- if not (has .Values.delivery (list "at-least-once" "exactly-once")) }}
{{- fail (printf "delivery must be at-least-once or exactly-once, not %q" .Values.delivery) }}
{{- end }}
{{- if gt (int64 .Values.maxBatchSize) (int64 .Values.maxInFlight) }}
{{- fail "maxBatchSize cannot exceed maxInFlight" }}
{{- end }}
{{- if .Values.kafka.sasl.mechanism }}
{{- if not (hasPrefix "SASL_" .Values.kafka.securityProtocol) }}
{{- fail "kafka.sasl.mechanism needs kafka.securityProtocol SASL_PLAINTEXT or SASL_SSL" }}
{{- end }}
{{- if not (or .Values.kafka.sasl.password .Values.kafka.sasl.existingSecret) }}
{{- fail "SASL needs kafka.sasl.existingSecret (preferred) or kafka.sasl.password" }}
{{- end }}
{{- if not .Values.kafka.sasl.username }}
{{- fail "SASL needs kafka.sasl.username" }}
{{- end }}
{{- else if hasPrefix "SASL_" .Values.kafka.securityProtocol }}
{{- fail "kafka.securityProtocol SASL_* needs kafka.sasl.mechanism" }}
{{- end }}
{{- $owned := include "streamer.ownedSettings" . | fromJsonArray }}
{{- range $key, $_ := .Values.settings }}
{{- if has $key $owned }}
{{- fail (printf "settings.%s is written by the chart from its own value; set that instead (values.yaml)" $key) }}
{{- end }}
{{- end }}
{{- end }}

{{/* A setting as the environment spells it: lists joined by commas, whole numbers without an
exponent (YAML numbers arrive as floats), the rest as text. */}}
{{- define "streamer.settingValue" -}}
{{- if kindIs "slice" . }}{{ join "," . }}
{{- else if and (kindIs "float64" .) (eq (floor .) .) }}{{ int64 . }}
{{- else }}{{ toString . }}
{{- end }}
{{- end }}
