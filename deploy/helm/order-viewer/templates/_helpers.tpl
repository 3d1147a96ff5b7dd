{{- define "order-viewer.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "order-viewer.fullname" -}}
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

{{- define "order-viewer.selectorLabels" -}}
app.kubernetes.io/name: {{ include "order-viewer.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "order-viewer.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "order-viewer.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "order-viewer.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "order-viewer.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "order-viewer.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Where the Secrets' files are mounted. */}}
{{- define "order-viewer.kafkaTlsDir" -}}/etc/order-viewer/kafka-tls{{- end }}
{{- define "order-viewer.tokensDir" -}}/etc/order-viewer/http-tokens{{- end }}

{{/*
Refuses values that would put a secret in a ConfigMap, or ask for settings the service rejects.
*/}}
{{- define "order-viewer.validate" -}}
{{- $secretSettings := list "DATABASE_URL" "KAFKA_SASL_USERNAME" "KAFKA_SASL_PASSWORD" "KAFKA_SSL_KEY_PASSWORD" "HTTP_TOKENS_FILE" }}
{{- range $name := $secretSettings }}
{{- if hasKey $.Values.settings $name }}
{{- fail (printf "settings.%s: secrets come from Kubernetes Secrets (see database, kafka.sasl, kafka.tls, httpAuth in values.yaml), never from plain values" $name) }}
{{- end }}
{{- end }}
{{- $chartOwned := list "HTTP_HOST" "HTTP_PORT" "KAFKA_GROUP_INSTANCE_ID" "KAFKA_SASL_MECHANISM" "KAFKA_SSL_CA_LOCATION" "KAFKA_SSL_CERTIFICATE_LOCATION" "KAFKA_SSL_KEY_LOCATION" "HTTP_AUTH" }}
{{- range $name := $chartOwned }}
{{- if hasKey $.Values.settings $name }}
{{- fail (printf "settings.%s is set by the chart (service.port, staticMembership, kafka.*, httpAuth.*): set those values instead" $name) }}
{{- end }}
{{- end }}
{{- range $name, $value := .Values.otel }}
{{- if not (regexMatch "^OTEL_[A-Z0-9_]+$" $name) }}
{{- fail (printf "otel.%s: only OpenTelemetry's OTEL_* variables go here; the service's settings go under settings" $name) }}
{{- end }}
{{- if hasKey $.Values.settings $name }}
{{- fail (printf "otel.%s is also under settings: give it once" $name) }}
{{- end }}
{{- end }}
{{- if not .Values.database.existingSecret }}
{{- fail "database.existingSecret: name the Secret that holds DATABASE_URL" }}
{{- end }}
{{- if and .Values.staticMembership (eq (toString (default "classic" .Values.settings.KAFKA_GROUP_PROTOCOL)) "consumer") }}
{{- fail "staticMembership needs KAFKA_GROUP_PROTOCOL=classic: the consumer protocol refuses static members; set staticMembership=false" }}
{{- end }}
{{- if and .Values.kafka.tls.existingSecret (ne (empty .Values.kafka.tls.certificateKey) (empty .Values.kafka.tls.keyKey)) }}
{{- fail "kafka.tls: certificateKey and keyKey go together (client authentication needs both)" }}
{{- end }}
{{- if and .Values.kafka.tls.keyPasswordKey (not .Values.kafka.tls.keyKey) }}
{{- fail "kafka.tls.keyPasswordKey needs kafka.tls.keyKey" }}
{{- end }}
{{- include "order-viewer.validateHttpAuth" . }}
{{- end }}

{{/*
The pods listen on 0.0.0.0, where the service refuses to start without authentication unless
told it is intended: refuse here what would otherwise crash-loop every pod.
*/}}
{{- define "order-viewer.validateHttpAuth" -}}
{{- $mode := toString (default "none" .Values.httpAuth.mode) }}
{{- if not (has $mode (list "none" "token" "jwt")) }}
{{- fail (printf "httpAuth.mode=%q: the service takes none, token or jwt" $mode) }}
{{- end }}
{{- if and (eq $mode "none") (ne (toString .Values.settings.HTTP_ALLOW_ANONYMOUS) "true") }}
{{- fail "httpAuth.mode is empty or none: the pods listen on 0.0.0.0, where the service refuses to serve orders to anyone without authentication; set httpAuth.mode to token (with httpAuth.tokensSecret) or jwt, or settings.HTTP_ALLOW_ANONYMOUS=\"true\" if anonymous access is intended" }}
{{- end }}
{{- if and (eq $mode "token") (not .Values.httpAuth.tokensSecret) }}
{{- fail "httpAuth.mode=token needs httpAuth.tokensSecret: name the Secret that holds the token file" }}
{{- end }}
{{- if eq $mode "jwt" }}
{{- range $name := list "HTTP_JWT_JWKS_URL" "HTTP_JWT_ISSUER" "HTTP_JWT_AUDIENCE" }}
{{- if not (index $.Values.settings $name) }}
{{- fail (printf "httpAuth.mode=jwt needs settings.%s" $name) }}
{{- end }}
{{- end }}
{{- end }}
{{- with .Values.serviceMonitor }}
{{- if and .enabled (ne $mode "none") (not .bearerTokenSecret.name) }}
{{- fail (printf "serviceMonitor.bearerTokenSecret.name: with httpAuth.mode=%s, /metrics needs a bearer token with the metrics:read scope; name the Secret that holds one" $mode) }}
{{- end }}
{{- if and .bearerTokenSecret.name (not .bearerTokenSecret.key) }}
{{- fail "serviceMonitor.bearerTokenSecret.key: name the Secret's key that holds the token" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The container's environment: plain settings by the ConfigMap, the rest here. */}}
{{- define "order-viewer.secretEnv" -}}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.database.existingSecret }}
      key: {{ .Values.database.urlKey }}
{{- with .Values.kafka.sasl }}
{{- if .existingSecret }}
- name: KAFKA_SASL_MECHANISM
  value: {{ .mechanism | quote }}
- name: KAFKA_SASL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .usernameKey }}
- name: KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .passwordKey }}
{{- end }}
{{- end }}
{{- with .Values.kafka.tls }}
{{- if .existingSecret }}
- name: KAFKA_SSL_CA_LOCATION
  value: {{ printf "%s/%s" (include "order-viewer.kafkaTlsDir" $) .caKey | quote }}
{{- if .certificateKey }}
- name: KAFKA_SSL_CERTIFICATE_LOCATION
  value: {{ printf "%s/%s" (include "order-viewer.kafkaTlsDir" $) .certificateKey | quote }}
- name: KAFKA_SSL_KEY_LOCATION
  value: {{ printf "%s/%s" (include "order-viewer.kafkaTlsDir" $) .keyKey | quote }}
{{- end }}
{{- if .keyPasswordKey }}
- name: KAFKA_SSL_KEY_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .keyPasswordKey }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
