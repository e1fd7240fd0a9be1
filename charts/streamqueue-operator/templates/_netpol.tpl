{{/* One egress rule: .ports to .cidrs and .peers, or to anywhere when both are empty. */}}
{{- define "streamqueue.egressRule" -}}
- ports:
  {{- range .rule.ports }}
  {{- $port := . }}
  {{- range $.protocols }}
    - {protocol: {{ . }}, port: {{ $port }}}
  {{- end }}
  {{- end }}
  {{- if or .rule.cidrs .rule.peers }}
  to:
    {{- range .rule.cidrs }}
    - ipBlock: {cidr: {{ . | quote }}}
    {{- end }}
    {{- with .rule.peers }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
{{- end }}

{{/* The DNS rule (UDP and TCP), if enabled. */}}
{{- define "streamqueue.dnsEgress" -}}
{{- if .Values.networkPolicy.dns.enabled -}}
{{ include "streamqueue.egressRule" (dict "rule" .Values.networkPolicy.dns "protocols" (list "UDP" "TCP")) }}
{{- end -}}
{{- end }}
