{{- define "llamacontroller.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else if contains "llamacontroller" .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-llamacontroller" .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "llamacontroller.labels" -}}
app.kubernetes.io/name: llamacontroller
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "llamacontroller.selector" -}}
app.kubernetes.io/name: llamacontroller
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "llamacontroller.image" -}}
{{- printf "%s:%s" .repository (toString .tag) -}}
{{- end -}}

{{- define "llamacontroller.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "llamacontroller.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "llamacontroller.redisSecret" -}}
{{- default (printf "%s-redis" (include "llamacontroller.fullname" .)) .Values.redis.existingSecret -}}
{{- end -}}

{{- define "llamacontroller.podSecurity" -}}
runAsNonRoot: true
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "llamacontroller.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}

{{/* The controller's config (llamacontroller.yaml): what the chart decides, with .Values.config merged over it. */}}
{{- define "llamacontroller.config" -}}
{{- $name := include "llamacontroller.fullname" . -}}
{{- $images := .Values.images -}}
{{- $backends := .Values.backends -}}
{{- $volume := dict "mount_path" "/models" -}}
{{- if .Values.models.existingClaim -}}
{{- $_ := set $volume "claim_name" .Values.models.existingClaim -}}
{{- else -}}
{{- $_ := set $volume "host_path" .Values.models.hostPath -}}
{{- end -}}
{{- if .Values.models.subPath -}}
{{- $_ := set $volume "sub_path" .Values.models.subPath -}}
{{- end -}}
{{- $kubernetes := dict "instance" .Release.Name "owner_deployment" (printf "%s-controller" $name) "image" (include "llamacontroller.image" $images.llamaServer) "image_pull_policy" $images.llamaServer.pullPolicy "gpu_count" $backends.gpuCount "gpu_resource" $backends.gpuResource "models" $volume "shm_size" $backends.shmSize -}}
{{- with .Values.imagePullSecrets }}{{ $_ := set $kubernetes "image_pull_secrets" . }}{{ end -}}
{{- with $backends.runtimeClassName }}{{ $_ := set $kubernetes "runtime_class_name" . }}{{ end -}}
{{- with $backends.nodeSelector }}{{ $_ := set $kubernetes "node_selector" . }}{{ end -}}
{{- with $backends.tolerations }}{{ $_ := set $kubernetes "tolerations" . }}{{ end -}}
{{- with $backends.env }}{{ $_ := set $kubernetes "env" . }}{{ end -}}
{{- $_ := set $kubernetes "resources" (dict "requests" ($backends.resources.requests | default dict) "limits" ($backends.resources.limits | default dict)) -}}
{{- $redisUrl := printf "redis://:${REDIS_PASSWORD}@%s-redis:6379/0" $name -}}
{{- if not .Values.redis.enabled }}{{ $redisUrl = .Values.redis.externalUrl }}{{ end -}}
{{- $tls := dict "mode" .Values.edge.tls.mode -}}
{{- if eq .Values.edge.tls.mode "secret" -}}
{{- $tls = dict "mode" "files" "cert_file" "/etc/llamacontroller/tls/tls.crt" "key_file" "/etc/llamacontroller/tls/tls.key" -}}
{{- else if eq .Values.edge.tls.mode "acme" -}}
{{- $_ := set $tls "email" .Values.edge.tls.email -}}
{{- end -}}
{{- $edge := dict "enabled" true "supervise" false "admin" (printf "%s-edge-admin:2019" $name) "admin_listen" "0.0.0.0:2019" "app" (printf "%s-gateway:11434" $name) "listen" "0.0.0.0:443" "tls" $tls -}}
{{- if .Values.edge.httpRedirect }}{{ $_ := set $edge "http_redirect" "0.0.0.0:80" }}{{ end -}}
{{- with .Values.edge.hostname }}{{ $_ := set $edge "hostname" . }}{{ end -}}
{{- $server := dict "listen" "0.0.0.0:11434" "data_dir" "/data" "trusted_proxies" (list (printf "%s-edge-pods" $name) (printf "%s-gateway-pods" $name)) -}}
{{- $runtime := dict "kind" "kubernetes" "stop_timeout" 20 "kubernetes" $kubernetes -}}
{{- if ge (int .Values.controller.replicas) 2 -}}
{{- /* a leader and standbys: the Lease elects the leader; a leader that shuts down leaves its backends to the next */ -}}
{{- $_ := set $server "leader_election" (dict "kind" "kubernetes" "name" (printf "%s-controller" $name)) -}}
{{- $_ := set $runtime "keep_backends_on_exit" true -}}
{{- end -}}
{{- $config := dict
  "server" $server
  "models_dir" "/models"
  "runtime" $runtime
  "store" (dict "kind" "redis" "redis_url" $redisUrl)
  "auth" (dict "secrets_dir" "/etc/llamacontroller/secrets")
  "edge" $edge
  "gateway" (dict "workers" 0 "controller" (printf "http://%s-controller:11434" $name) "metrics_listen" "0.0.0.0:9464")
  "models" .Values.models.catalog
-}}
{{- toYaml (mustMergeOverwrite $config (deepCopy .Values.config)) -}}
{{- end -}}
