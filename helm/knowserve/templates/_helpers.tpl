{{/*
Expand the name of the chart.
*/}}
{{- define "knowserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Create a default fully qualified app name (63 characters at most: DNS names).
*/}}
{{- define "knowserve.fullname" -}}
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

{{/*
Chart name and version as used by the chart label.
*/}}
{{- define "knowserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "knowserve.labels" -}}
helm.sh/chart: {{ include "knowserve.chart" . }}
{{ include "knowserve.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: knowserve
{{- end }}

{{/*
Selector labels.
*/}}
{{- define "knowserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "knowserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Name, labels and selector labels of one component. Call with (dict "root" $ "component" "retrieval").
*/}}
{{- define "knowserve.componentName" -}}
{{- printf "%s-%s" (include "knowserve.fullname" .root) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "knowserve.componentLabels" -}}
{{ include "knowserve.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "knowserve.componentSelectorLabels" -}}
{{ include "knowserve.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Image reference of one component: its own image values over the shared ones; the tag defaults to appVersion.
*/}}
{{- define "knowserve.image" -}}
{{- $values := index .root.Values .component -}}
{{- $own := $values.image | default dict -}}
{{- $repository := $own.repository | default (printf "%s/%s" .root.Values.image.repository .component) -}}
{{- $tag := $own.tag | default .root.Values.image.tag | default .root.Chart.AppVersion -}}
{{- printf "%s:%s" $repository $tag -}}
{{- end }}

{{- define "knowserve.pullPolicy" -}}
{{- $values := index .root.Values .component -}}
{{- ($values.image | default dict).pullPolicy | default .root.Values.image.pullPolicy -}}
{{- end }}

{{/*
In-cluster gRPC address of a component.
*/}}
{{- define "knowserve.target" -}}
{{- $values := index .root.Values .component -}}
{{- printf "%s:%v" (include "knowserve.componentName" .) $values.port -}}
{{- end }}

{{/*
KNOWSERVE_<SVC>_<KEY> environment entries from a settings map. Call with (dict "prefix" "RETRIEVAL" "settings" map).
*/}}
{{- define "knowserve.settingsEnv" -}}
{{- range $key, $value := .settings }}
- name: {{ printf "KNOWSERVE_%s_%s" $.prefix (upper $key) }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end }}

{{/*
Environment shared by every gRPC service: bind address, ports, log format, auth token file.
Call with (dict "root" $ "component" "retrieval").
*/}}
{{- define "knowserve.commonEnv" -}}
{{- $values := index .root.Values .component -}}
{{- $prefix := upper .component -}}
- name: KNOWSERVE_{{ $prefix }}_HOST
  value: "0.0.0.0"
- name: KNOWSERVE_{{ $prefix }}_PORT
  value: {{ $values.port | quote }}
- name: KNOWSERVE_{{ $prefix }}_METRICS_PORT
  value: {{ $values.metricsPort | quote }}
- name: KNOWSERVE_{{ $prefix }}_LOG_JSON
  value: {{ .root.Values.logJson | quote }}
- name: KNOWSERVE_{{ $prefix }}_SHUTDOWN_DELAY_SECONDS
  value: "5"
# caches on the writable /tmp emptyDir (the root filesystem is read-only)
- name: KNOWSERVE_MODEL_CACHE
  value: /tmp/cache/models
- name: KNOWSERVE_PACKAGE_CACHE
  value: /tmp/cache/packages
- name: HF_HOME
  value: /tmp/cache/huggingface
- name: MPLCONFIGDIR
  value: /tmp/cache/matplotlib
{{- if .root.Values.auth.existingSecret }}
- name: KNOWSERVE_{{ $prefix }}_AUTH_TOKEN_FILE
  value: /var/run/knowserve/auth/{{ .root.Values.auth.key }}
{{- end }}
{{- if .root.Values.tls.existingSecret }}
{{- if ne .component "generation" }}
# mTLS: this service's certificate, and the CA its clients' certificates must chain to
- name: KNOWSERVE_{{ $prefix }}_TLS_CERT_FILE
  value: /var/run/knowserve/tls/tls.crt
- name: KNOWSERVE_{{ $prefix }}_TLS_KEY_FILE
  value: /var/run/knowserve/tls/tls.key
- name: KNOWSERVE_{{ $prefix }}_TLS_CLIENT_CA_FILE
  value: /var/run/knowserve/tls/ca.crt
{{- end }}
# its clients: the same certificate towards every service but generation (plaintext behind Serve's proxy)
- name: KNOWSERVE_{{ $prefix }}_CLIENT_TLS_CA_FILE
  value: /var/run/knowserve/tls/ca.crt
- name: KNOWSERVE_{{ $prefix }}_CLIENT_TLS_CERT_FILE
  value: /var/run/knowserve/tls/tls.crt
- name: KNOWSERVE_{{ $prefix }}_CLIENT_TLS_KEY_FILE
  value: /var/run/knowserve/tls/tls.key
- name: KNOWSERVE_{{ $prefix }}_CLIENTS
  value: {{ dict "generation" (dict "tls" false) | toJson | quote }}
{{- end }}
{{- end }}

{{/*
gRPC startup/readiness/liveness probes of a plain gRPC service: Kubernetes' native grpc probes, or, with mTLS on
(native probes speak plaintext only), the image's health check over mTLS. Call with (dict "root" $ "port" N).
*/}}
{{- define "knowserve.grpcProbes" -}}
{{- $check := dict "grpc" (dict "port" (int .port)) -}}
{{- if .root.Values.tls.existingSecret -}}
{{- $check = dict "exec" (dict "command" (list "python" "-m" "services.common.healthcheck" "--host" "localhost" "--port" (toString .port) "--tls-ca" "/var/run/knowserve/tls/ca.crt" "--tls-cert" "/var/run/knowserve/tls/tls.crt" "--tls-key" "/var/run/knowserve/tls/tls.key")) -}}
{{- end -}}
startupProbe:
  {{- toYaml (merge (dict "periodSeconds" 5 "failureThreshold" 60) $check) | nindent 2 }}
readinessProbe:
  {{- toYaml (merge (dict "periodSeconds" 10 "timeoutSeconds" 5) $check) | nindent 2 }}
livenessProbe:
  {{- toYaml (merge (dict "periodSeconds" 15 "timeoutSeconds" 5 "failureThreshold" 4) $check) | nindent 2 }}
{{- end }}

{{/*
Volumes and mounts every pod has: a writable /tmp (the root filesystem is read-only) and the auth token.
*/}}
{{- define "knowserve.commonVolumes" -}}
- name: tmp
  emptyDir: {}
{{- if .Values.auth.existingSecret }}
- name: auth
  secret:
    secretName: {{ .Values.auth.existingSecret }}
{{- end }}
{{- if .Values.tls.existingSecret }}
- name: tls
  secret:
    secretName: {{ .Values.tls.existingSecret }}
{{- end }}
{{- end }}

{{- define "knowserve.commonMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if .Values.auth.existingSecret }}
- name: auth
  mountPath: /var/run/knowserve/auth
  readOnly: true
{{- end }}
{{- if .Values.tls.existingSecret }}
- name: tls
  mountPath: /var/run/knowserve/tls
  readOnly: true
{{- end }}
{{- end }}

{{/*
Name of the checkpoint PVC shared by training and generation.
*/}}
{{- define "knowserve.checkpointClaim" -}}
{{- .Values.checkpoints.existingClaim | default (printf "%s-checkpoints" (include "knowserve.fullname" .)) -}}
{{- end }}

{{/*
Environment of the generation pods. Call with (dict "root" $ "component" ...).
*/}}
{{- define "knowserve.generationEnv" -}}
{{- $g := .root.Values.generation -}}
{{- include "knowserve.commonEnv" . }}
- name: KNOWSERVE_GENERATION_HTTP_PORT
  value: {{ $g.httpPort | quote }}
- name: KNOWSERVE_GENERATION_DASHBOARD_PORT
  value: {{ $g.dashboardPort | quote }}
- name: KNOWSERVE_GENERATION_MODELS
  value: {{ include "knowserve.generationModels" .root | quote }}
- name: KNOWSERVE_GENERATION_KEPT_VERSIONS
  value: {{ $g.keptVersions | quote }}
- name: KNOWSERVE_GENERATION_OPENAI_API
  value: {{ $g.openai.enabled | quote }}
- name: KNOWSERVE_GENERATION_CHECKPOINT_ROOT
  value: /checkpoints
- name: KNOWSERVE_GENERATION_METRICS_DIR
  value: /tmp/generation-metrics
- name: KNOWSERVE_GENERATION_RETRIEVAL_TARGET
  value: {{ include "knowserve.target" (dict "root" .root "component" "retrieval") | quote }}
- name: KNOWSERVE_GENERATION_ANSWER_TARGET
  value: {{ ternary (include "knowserve.target" (dict "root" .root "component" "answer")) "" .root.Values.answer.enabled | quote }}
- name: KNOWSERVE_GENERATION_LIVE_SAMPLE_RATE
  value: {{ $g.live.sampleRate | quote }}
- name: KNOWSERVE_GENERATION_GATE_MIN_ANSWERS
  value: {{ $g.live.gateMinAnswers | quote }}
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
{{- if eq $g.mode "kuberay" }}
- name: KNOWSERVE_GENERATION_DASHBOARD_HOST
  value: {{ printf "%s-head-svc" (include "knowserve.componentName" .) | quote }}
{{- end }}
{{- include "knowserve.settingsEnv" (dict "prefix" "GENERATION" "settings" $g.settings) }}
{{- end }}

{{/*
Environment of the training pods. Call with (dict "root" $ "component" ...).
*/}}
{{- define "knowserve.trainingEnv" -}}
- name: KNOWSERVE_TRAINING_GENERATION_TARGET
  value: {{ include "knowserve.target" (dict "root" .root "component" "generation") | quote }}
- name: KNOWSERVE_TRAINING_REWARD_TARGET
  value: {{ include "knowserve.target" (dict "root" .root "component" "reward") | quote }}
- name: KNOWSERVE_TRAINING_CHECKPOINT_ROOT
  value: /checkpoints
- name: KNOWSERVE_TRAINING_RUNS_DIR
  value: /data/runs
- name: KNOWSERVE_TRAINING_EVAL_DIR
  value: /data/eval
- name: KNOWSERVE_WORLD_DIR
  value: /data/world
- name: TRL_EXPERIMENTAL_SILENCE
  value: "1"
{{- end }}

{{/*
The generation models as the JSON list KNOWSERVE_GENERATION_MODELS reads (values' camelCase -> settings' names).
*/}}
{{- define "knowserve.generationModels" -}}
{{- $out := list }}
{{- range .Values.generation.models }}
{{- $m := dict "name" .name }}
{{- with .path }}{{ $_ := set $m "path" . }}{{ end }}
{{- with .engine }}{{ $_ := set $m "engine" . }}{{ end }}
{{- with .replicas }}{{ $_ := set $m "replicas" . }}{{ end }}
{{- with .replicaNumCpus }}{{ $_ := set $m "replica_num_cpus" . }}{{ end }}
{{- if hasKey . "replicaNumGpus" }}{{ $_ := set $m "replica_num_gpus" .replicaNumGpus }}{{ end }}
{{- with .threads }}{{ $_ := set $m "threads" . }}{{ end }}
{{- with .maxModelLen }}{{ $_ := set $m "max_model_len" . }}{{ end }}
{{- if gt (.replicaNumGpus | default 0 | float64) 0.0 }}{{ $_ := set $m "device" "cuda" }}{{ end }}
{{- $out = append $out $m }}
{{- end }}
{{- toJson $out }}
{{- end }}
