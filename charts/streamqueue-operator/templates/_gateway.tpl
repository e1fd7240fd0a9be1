{{/* The gateway (gateway.enabled, docs/gateway.md): names, labels, image, mounted files, config. */}}

{{/* Its own app name: its pods must not match the operator's selector (name + instance). */}}
{{- define "streamqueue.gatewayName" -}}
{{- printf "%s-gateway" (include "streamqueue.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "streamqueue.gatewaySelectorLabels" -}}
app.kubernetes.io/name: streamqueue-gateway
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "streamqueue.gatewayLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "streamqueue.gatewaySelectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: streamqueue
app.kubernetes.io/component: gateway
{{- end }}

{{- define "streamqueue.gatewayImage" -}}
{{- printf "%s:%s" .Values.gateway.image.repository (default .Chart.AppVersion .Values.gateway.image.tag) }}
{{- end }}

{{/* Where the config file is mounted (the image's default --config names the same path). */}}
{{- define "streamqueue.gatewayConfigPath" -}}
/etc/streamqueue-gateway/config/config.yaml
{{- end }}

{{/*
The Secrets mounted as files: secrets key -> (volume, directory, the config section and key its path
goes to). Whole directories, not subPath mounts: the kubelet updates those when a Secret changes, and
the gateway re-reads its key files on change (rotation without a restart).
*/}}
{{- define "streamqueue.gatewayFiles" -}}
apiKeys: {volume: api-keys, dir: /etc/streamqueue-gateway/api-keys, section: auth, field: apiKeysFile}
jwtHs256: {volume: jwt-hs256, dir: /etc/streamqueue-gateway/jwt-hs256, section: jwt, field: hs256SecretFile}
jwks: {volume: jwks, dir: /etc/streamqueue-gateway/jwks, section: jwt, field: jwksFile}
redisCa: {volume: redis-ca, dir: /etc/streamqueue-gateway/redis-ca, section: redis, field: tlsCaFile}
{{- end }}

{{/* gateway.config with the file paths of the Secrets that are named, as YAML. */}}
{{- define "streamqueue.gatewayConfig" -}}
{{- $config := deepCopy .Values.gateway.config }}
{{- $auth := default (dict) $config.auth }}
{{- $sections := dict "auth" $auth "jwt" (default (dict) $auth.jwt) "redis" (default (dict) $config.redis) }}
{{- range $name, $file := include "streamqueue.gatewayFiles" . | fromYaml }}
{{- $ref := index $.Values.gateway.secrets $name }}
{{- if $ref.name }}
{{- $_ := set (index $sections $file.section) $file.field (printf "%s/%s" $file.dir $ref.key) }}
{{- end }}
{{- end }}
{{- if $sections.jwt }}{{ $_ := set $auth "jwt" $sections.jwt }}{{ end }}
{{- $_ := set $config "auth" $auth }}
{{- if $sections.redis }}{{ $_ := set $config "redis" $sections.redis }}{{ end }}
{{- toYaml $config }}
{{- end }}
