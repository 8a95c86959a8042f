{{/* The roles, each one Deployment running `recon-stream run <role>`. */}}
{{- define "recon-stream.roles" -}}
{{- $roles := list "ingest" "scanner" "scheduler" -}}
{{- if .Values.notifier.enabled -}}
{{- $roles = append $roles "notifier" -}}
{{- end -}}
{{- $roles | toJson -}}
{{- end -}}

{{/*
Where the scope ConfigMap is mounted (RECON_SCOPE_FILE is scope.yaml there): a
directory of its own, like the risk policy's, outside /etc/recon-stream where
the TLS Secrets mount.
*/}}
{{- define "recon-stream.scopeDir" -}}/etc/recon-stream-scope{{- end -}}

{{/* Where the notifier's ConfigMap is mounted, and the file RECON_NOTIFY_FILE names. */}}
{{- define "recon-stream.notifyDir" -}}/etc/recon-stream-notifier{{- end -}}

{{/*
The `secret_env` names of notifier.notifyFile, as a JSON list. Fails on a file
that is not YAML or not a mapping, and on an inline `secret:` (it would sit in a
ConfigMap); the app checks the rest (schemas/notify.v1.json) when it starts.
*/}}
{{- define "recon-stream.notifySecretEnv" -}}
{{- $file := .Values.notifier.notifyFile | fromYaml -}}
{{- if hasKey $file "Error" -}}
{{- fail (printf "notifier.notifyFile is not YAML: %s" (index $file "Error")) -}}
{{- end -}}
{{- if not (kindIs "slice" $file.destinations) -}}
{{- fail "notifier.notifyFile needs a `destinations:` list (`destinations: []` for none)" -}}
{{- end -}}
{{- $names := list -}}
{{- range $i, $d := $file.destinations -}}
{{- if not (kindIs "map" $d) -}}
{{- fail (printf "notifier.notifyFile: destination %d is not a mapping" $i) -}}
{{- end -}}
{{- if hasKey $d "secret" -}}
{{- fail (printf "notifier.notifyFile: destination %v has an inline secret; use secret_env and notifier.secrets or notifier.existingSecret, so the key is in a Secret, not a ConfigMap" (default $i $d.name)) -}}
{{- end -}}
{{- with $d.secret_env -}}
{{- $names = append $names . -}}
{{- end -}}
{{- end -}}
{{- $names | uniq | toJson -}}
{{- end -}}

{{/* The Secret the notifier's `secret_env` variables come from. */}}
{{- define "recon-stream.notifierSecretName" -}}
{{- default (printf "%s-notifier" (include "recon-stream.fullname" .)) .Values.notifier.existingSecret -}}
{{- end -}}

{{- define "recon-stream.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Leaves room for the longest suffix ("-scheduler") within 63 characters. */}}
{{- define "recon-stream.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The name of a role's objects. Call with (dict "root" $ "role" "ingest"). */}}
{{- define "recon-stream.roleName" -}}
{{- printf "%s-%s" (include "recon-stream.fullname" .root) .role -}}
{{- end -}}

{{- define "recon-stream.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "recon-stream.selectorLabels" -}}
app.kubernetes.io/name: {{ include "recon-stream.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "recon-stream.labels" -}}
helm.sh/chart: {{ include "recon-stream.chart" . }}
{{ include "recon-stream.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: recon-stream
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Call with (dict "root" $ "role" "ingest"). */}}
{{- define "recon-stream.roleSelectorLabels" -}}
{{ include "recon-stream.selectorLabels" .root }}
app.kubernetes.io/component: {{ .role }}
{{- end -}}

{{- define "recon-stream.roleLabels" -}}
{{ include "recon-stream.labels" .root }}
app.kubernetes.io/component: {{ .role }}
{{- end -}}

{{- define "recon-stream.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "recon-stream.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "recon-stream.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The Secret the workers read their credentials from. */}}
{{- define "recon-stream.secretName" -}}
{{- default (include "recon-stream.fullname" .) .Values.existingSecret -}}
{{- end -}}

{{- define "recon-stream.sasl" -}}
{{- if hasPrefix "SASL" .Values.kafka.securityProtocol -}}true{{- end -}}
{{- end -}}

{{- define "recon-stream.kafkaTls" -}}
{{- if hasSuffix "SSL" .Values.kafka.securityProtocol -}}true{{- end -}}
{{- end -}}

{{/* Where the TLS Secrets are mounted. */}}
{{- define "recon-stream.kafkaTlsDir" -}}/etc/recon-stream/kafka-tls{{- end -}}
{{- define "recon-stream.mongodbTlsDir" -}}/etc/recon-stream/mongodb-tls{{- end -}}

{{/*
The non-secret settings as a map of RECON_* variables (YAML). The ConfigMap
holds them; the init hook Job, which runs before the ConfigMap exists on a
first install, gets them inline. Keys set here win over settings.extra.
*/}}
{{- define "recon-stream.settings" -}}
{{- $v := .Values -}}
{{- $s := dict
  "RECON_KAFKA_BOOTSTRAP_SERVERS" $v.kafka.bootstrapServers
  "RECON_KAFKA_SECURITY_PROTOCOL" $v.kafka.securityProtocol
  "RECON_KAFKA_TOPIC_PARTITIONS" (toString (int64 $v.kafka.topicPartitions))
  "RECON_KAFKA_TOPIC_REPLICATION_FACTOR" (toString (int64 $v.kafka.topicReplicationFactor))
  "RECON_TOPIC_HEARTBEATS" $v.kafka.topics.heartbeats
  "RECON_TOPIC_SCAN_REQUESTS" $v.kafka.topics.scanRequests
  "RECON_TOPIC_EXPOSURES" $v.kafka.topics.exposures
  "RECON_TOPIC_DLQ" $v.kafka.topics.dlq
  "RECON_TOPIC_NOTIFY_DLQ" $v.kafka.topics.notifyDlq
  "RECON_TOPIC_COMMANDS" $v.kafka.topics.commands
  "RECON_TOPIC_EXPOSURE_STATE" $v.kafka.topics.exposureState
  "RECON_TOPIC_EXPOSURES_OCSF" $v.kafka.topics.exposuresOcsf
  "RECON_INGEST_GROUP_ID" $v.kafka.consumerGroups.ingest
  "RECON_SCANNER_GROUP_ID" $v.kafka.consumerGroups.scanner
  "RECON_COMMANDS_GROUP_ID" $v.kafka.consumerGroups.commands
  "RECON_NOTIFIER_GROUP_ID" $v.kafka.consumerGroups.notifier
  "RECON_MONGODB_DATABASE" $v.mongodb.database
  "RECON_SHODAN_RATE" (toString $v.shodan.rate)
  "RECON_HTTP_PORT" (toString (int64 $v.settings.httpPort))
  "RECON_GRACEFUL_TIMEOUT_SECONDS" (toString $v.settings.gracefulTimeoutSeconds)
  "RECON_LOG_LEVEL" $v.settings.logLevel
  "RECON_SHODAN_SCAN_CREDITS_PER_DAY" (toString (int64 $v.freshness.scanCreditsPerDay))
  "RECON_SHODAN_SCAN_POLL_SECONDS" (include "recon-stream.number" $v.freshness.scanPollSeconds)
  "RECON_SHODAN_SCAN_TIMEOUT_SECONDS" (include "recon-stream.number" $v.freshness.scanTimeoutSeconds)
  "RECON_VERIFY_TCP" (toString $v.freshness.verification.enabled)
  "RECON_VERIFY_RATE" (include "recon-stream.number" $v.freshness.verification.rate)
  "RECON_VERIFY_TIMEOUT_SECONDS" (include "recon-stream.number" $v.freshness.verification.timeoutSeconds)
  "RECON_VERIFY_CONFIRM_SECONDS" (include "recon-stream.number" $v.freshness.verification.confirmSeconds)
-}}
{{- if include "recon-stream.sasl" . -}}
{{- $_ := set $s "RECON_KAFKA_SASL_MECHANISM" $v.kafka.sasl.mechanism -}}
{{- end -}}
{{- if $v.riskPolicy -}}
{{- $_ := set $s "RECON_RISK_POLICY_FILE" "/etc/recon-stream-policy/risk-policy.yaml" -}}
{{- end -}}
{{- if $v.scope -}}
{{- $_ := set $s "RECON_SCOPE_FILE" (printf "%s/scope.yaml" (include "recon-stream.scopeDir" .)) -}}
{{- end -}}
{{- if $v.notifier.enabled -}}
{{- $_ := set $s "RECON_NOTIFY_FILE" (printf "%s/notify.yaml" (include "recon-stream.notifyDir" .)) -}}
{{- end -}}
{{- if include "recon-stream.kafkaTls" . -}}
{{- $_ := set $s "RECON_KAFKA_SSL_CHECK_HOSTNAME" (toString $v.kafka.tls.checkHostname) -}}
{{- if $v.kafka.tls.existingSecret -}}
{{- $_ := set $s "RECON_KAFKA_SSL_CAFILE" (printf "%s/%s" (include "recon-stream.kafkaTlsDir" .) $v.kafka.tls.caKey) -}}
{{- if $v.kafka.tls.clientCertificate -}}
{{- $_ := set $s "RECON_KAFKA_SSL_CERTFILE" (printf "%s/tls.crt" (include "recon-stream.kafkaTlsDir" .)) -}}
{{- $_ := set $s "RECON_KAFKA_SSL_KEYFILE" (printf "%s/tls.key" (include "recon-stream.kafkaTlsDir" .)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if $v.mongodb.tls.enabled -}}
{{- $_ := set $s "RECON_MONGODB_TLS" "true" -}}
{{- $_ := set $s "RECON_MONGODB_TLS_ALLOW_INVALID_HOSTNAMES" (toString $v.mongodb.tls.allowInvalidHostnames) -}}
{{- if $v.mongodb.tls.existingSecret -}}
{{- $_ := set $s "RECON_MONGODB_TLS_CA_FILE" (printf "%s/%s" (include "recon-stream.mongodbTlsDir" .) $v.mongodb.tls.caKey) -}}
{{- if $v.mongodb.tls.certificateKeyKey -}}
{{- $_ := set $s "RECON_MONGODB_TLS_CERTIFICATE_KEY_FILE" (printf "%s/%s" (include "recon-stream.mongodbTlsDir" .) $v.mongodb.tls.certificateKeyKey) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- with $v.shodan.provider -}}
{{- $_ := set $s "RECON_SHODAN_PROVIDER" . -}}
{{- end -}}
{{- with $v.shodan.apiUrl -}}
{{- $_ := set $s "RECON_SHODAN_API_URL" . -}}
{{- end -}}
{{- with $v.vulnFeeds.kevSource -}}
{{- $_ := set $s "RECON_KEV_SOURCE" . -}}
{{- end -}}
{{- with $v.vulnFeeds.epssSource -}}
{{- $_ := set $s "RECON_EPSS_SOURCE" . -}}
{{- end -}}
{{- range $key, $value := $v.settings.extra -}}
{{- if not (hasKey $s $key) -}}
{{- /* Helm reads numbers as float64: 1000000 would print as 1e+06. */ -}}
{{- if and (kindIs "float64" $value) (eq $value (float64 (int64 $value))) -}}
{{- $value = int64 $value -}}
{{- end -}}
{{- $_ := set $s $key (toString $value) -}}
{{- end -}}
{{- end -}}
{{- toYaml $s -}}
{{- end -}}

{{/*
A number as the app reads it: a whole number without a fraction or an exponent
(Helm reads every number as float64, and 1000000 would print as 1e+06).
*/}}
{{- define "recon-stream.number" -}}
{{- if and (kindIs "float64" .) (eq . (float64 (int64 .))) -}}
{{- int64 . -}}
{{- else -}}
{{- toString . -}}
{{- end -}}
{{- end -}}

{{/* The settings freshness.* sets: settings.extra may not set them as well. */}}
{{- define "recon-stream.freshnessSettings" -}}
{{- dict
  "RECON_SHODAN_SCAN_CREDITS_PER_DAY" "freshness.scanCreditsPerDay"
  "RECON_SHODAN_SCAN_POLL_SECONDS" "freshness.scanPollSeconds"
  "RECON_SHODAN_SCAN_TIMEOUT_SECONDS" "freshness.scanTimeoutSeconds"
  "RECON_VERIFY_TCP" "freshness.verification.enabled"
  "RECON_VERIFY_RATE" "freshness.verification.rate"
  "RECON_VERIFY_TIMEOUT_SECONDS" "freshness.verification.timeoutSeconds"
  "RECON_VERIFY_CONFIRM_SECONDS" "freshness.verification.confirmSeconds"
  | toJson -}}
{{- end -}}

{{/*
The ranges the verification egress policy never opens, whatever Shodan reported:
private (RFC 1918), CGNAT, link-local, loopback; for IPv6 unique-local, link-local
and loopback. Then networkPolicy.egress.verificationExcept, split by family.
Returns {"v4": [...], "v6": [...]} as JSON.
*/}}
{{- define "recon-stream.verificationExcept" -}}
{{- $v4 := list "10.0.0.0/8" "172.16.0.0/12" "192.168.0.0/16" "100.64.0.0/10" "169.254.0.0/16" "127.0.0.0/8" -}}
{{- $v6 := list "fc00::/7" "fe80::/10" "::1/128" -}}
{{- range .Values.networkPolicy.egress.verificationExcept -}}
{{- if contains ":" . -}}
{{- $v6 = append $v6 . -}}
{{- else -}}
{{- $v4 = append $v4 . -}}
{{- end -}}
{{- end -}}
{{- dict "v4" ($v4 | uniq) "v6" ($v6 | uniq) | toJson -}}
{{- end -}}

{{/*
The credentials as env entries read from the Secret. Call with
(dict "root" $ "secret" NAME "shodan" BOOL): only the scanner gets the Shodan key.
*/}}
{{- define "recon-stream.secretEnv" -}}
{{- $v := .root.Values -}}
{{- $keys := $v.existingSecretKeys -}}
- name: RECON_MONGODB_URI
  valueFrom:
    secretKeyRef:
      name: {{ .secret }}
      key: {{ $keys.mongodbUri }}
{{- if include "recon-stream.sasl" .root }}
- name: RECON_KAFKA_SASL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ .secret }}
      key: {{ $keys.kafkaSaslUsername }}
- name: RECON_KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .secret }}
      key: {{ $keys.kafkaSaslPassword }}
{{- end }}
{{- if include "recon-stream.mongodbKeyPassword" .root }}
- name: RECON_MONGODB_TLS_CERTIFICATE_KEY_FILE_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .secret }}
      key: {{ $keys.mongodbTlsCertificateKeyPassword }}
{{- end }}
{{- if and .shodan (eq $v.shodan.provider "api") }}
{{- /* Not optional: without the key the pod does not start, and says which key is missing. */}}
- name: RECON_SHODAN_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .secret }}
      key: {{ $keys.shodanApiKey }}
      optional: false
{{- end }}
{{- end -}}

{{/* The MongoDB client key is encrypted: its password comes from the credentials Secret. */}}
{{- define "recon-stream.mongodbKeyPassword" -}}
{{- $tls := .Values.mongodb.tls -}}
{{- if and $tls.enabled $tls.certificateKeyKey $tls.certificateKeyEncrypted -}}true{{- end -}}
{{- end -}}

{{/* The vulnerability feed sources fetched over the network (http:// or https://). */}}
{{- define "recon-stream.feedUrls" -}}
{{- $urls := list -}}
{{- range $source := list .Values.vulnFeeds.kevSource .Values.vulnFeeds.epssSource -}}
{{- if regexMatch "^https?://" $source -}}
{{- $urls = append $urls $source -}}
{{- end -}}
{{- end -}}
{{- $urls | toJson -}}
{{- end -}}

{{/* Secret data (base64), shared by the release Secret and the init hook's copy. */}}
{{- define "recon-stream.secretData" -}}
{{- $v := .Values -}}
{{- $keys := $v.existingSecretKeys -}}
{{ $keys.mongodbUri }}: {{ $v.mongodb.uri | b64enc | quote }}
{{- if $v.shodan.apiKey }}
{{ $keys.shodanApiKey }}: {{ $v.shodan.apiKey | b64enc | quote }}
{{- end }}
{{- if include "recon-stream.sasl" . }}
{{ $keys.kafkaSaslUsername }}: {{ $v.kafka.sasl.username | b64enc | quote }}
{{ $keys.kafkaSaslPassword }}: {{ $v.kafka.sasl.password | b64enc | quote }}
{{- end }}
{{- if include "recon-stream.mongodbKeyPassword" . }}
{{ $keys.mongodbTlsCertificateKeyPassword }}: {{ $v.mongodb.tls.certificateKeyPassword | b64enc | quote }}
{{- end }}
{{- end -}}

{{/* The chart-made notifier Secret's data (base64): notifier.secrets. */}}
{{- define "recon-stream.notifierSecretData" -}}
{{- range $name, $value := .Values.notifier.secrets }}
{{ $name }}: {{ $value | toString | b64enc | quote }}
{{- end }}
{{- end -}}

{{/*
The workers' volumes. Call with (dict "root" $ "hook" BOOL): a hook (the init Job)
runs before the release's own ConfigMaps and Secrets exist, so it gets only what
exists by then: the emptyDir and the TLS Secrets you made. The risk policy and
the scope file are release ConfigMaps (and init reads neither).
*/}}
{{- define "recon-stream.volumes" -}}
{{- $root := .root -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ $root.Values.tmpSizeLimit }}
{{- if and $root.Values.riskPolicy (not .hook) }}
- name: risk-policy
  configMap:
    name: {{ include "recon-stream.fullname" $root }}-risk-policy
{{- end }}
{{- if and $root.Values.scope (not .hook) }}
- name: scope
  configMap:
    name: {{ include "recon-stream.fullname" $root }}-scope
{{- end }}
{{- with $root }}
{{- if and (include "recon-stream.kafkaTls" .) .Values.kafka.tls.existingSecret }}
- name: kafka-tls
  secret:
    secretName: {{ .Values.kafka.tls.existingSecret }}
    defaultMode: 0440
{{- end }}
{{- if and .Values.mongodb.tls.enabled .Values.mongodb.tls.existingSecret }}
- name: mongodb-tls
  secret:
    secretName: {{ .Values.mongodb.tls.existingSecret }}
    defaultMode: 0440
{{- end }}
{{- end }}
{{- end -}}

{{/* The mounts of those volumes; the same (dict "root" $ "hook" BOOL). */}}
{{- define "recon-stream.volumeMounts" -}}
{{- $root := .root -}}
- name: tmp
  mountPath: /tmp
{{- if and $root.Values.riskPolicy (not .hook) }}
- name: risk-policy
  # A directory of its own: the TLS Secrets mount under /etc/recon-stream, and a
  # read-only ConfigMap volume there could not hold their mount points.
  mountPath: /etc/recon-stream-policy
  readOnly: true
{{- end }}
{{- if and $root.Values.scope (not .hook) }}
- name: scope
  mountPath: {{ include "recon-stream.scopeDir" $root }}
  readOnly: true
{{- end }}
{{- with $root }}
{{- if and (include "recon-stream.kafkaTls" .) .Values.kafka.tls.existingSecret }}
- name: kafka-tls
  mountPath: {{ include "recon-stream.kafkaTlsDir" . }}
  readOnly: true
{{- end }}
{{- if and .Values.mongodb.tls.enabled .Values.mongodb.tls.existingSecret }}
- name: mongodb-tls
  mountPath: {{ include "recon-stream.mongodbTlsDir" . }}
  readOnly: true
{{- end }}
{{- end }}
{{- end -}}

{{/* Refuse settings that cannot work; the schema cannot compare two values. */}}
{{- define "recon-stream.validate" -}}
{{- if le (float64 .Values.terminationGracePeriodSeconds) (float64 .Values.settings.gracefulTimeoutSeconds) -}}
{{- fail (printf "terminationGracePeriodSeconds (%v) must be longer than settings.gracefulTimeoutSeconds (%v): otherwise Kubernetes kills a worker in the middle of a batch" .Values.terminationGracePeriodSeconds .Values.settings.gracefulTimeoutSeconds) -}}
{{- end -}}
{{- if .Values.notifier.enabled -}}
{{- $names := include "recon-stream.notifySecretEnv" . | fromJsonArray -}}
{{- if not .Values.notifier.existingSecret -}}
{{- range $names -}}
{{- if not (index $.Values.notifier.secrets .) -}}
{{- fail (printf "notifier.notifyFile names secret_env %s, which has no value in notifier.secrets (or set notifier.existingSecret)" .) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- with .Values.scope -}}
{{- /* The app checks the rest (schemas/scope.v1.json) when a worker starts, and exits 2. */ -}}
{{- $scope := . | fromYaml -}}
{{- if hasKey $scope "Error" -}}
{{- fail (printf "scope is not a YAML mapping (a scope file, schemas/scope.v1.json): %s" (index $scope "Error")) -}}
{{- end -}}
{{- if ne (toString (index $scope "version")) "1" -}}
{{- fail "scope: a scope file says `version: 1` (schemas/scope.v1.json); check it with `recon-stream scope check FILE`" -}}
{{- end -}}
{{- end -}}
{{- range $key, $value := include "recon-stream.freshnessSettings" . | fromJson -}}
{{- if hasKey $.Values.settings.extra $key -}}
{{- fail (printf "settings.extra.%s: set %s instead (the chart sets %s from it, and would ignore this one)" $key $value $key) -}}
{{- end -}}
{{- end -}}
{{- range $role := list "ingest" "scanner" -}}
{{- $a := (index $.Values $role).autoscaling -}}
{{- if and (ne $a.mode "none") (gt (int $a.minReplicas) (int $a.maxReplicas)) -}}
{{- fail (printf "%s.autoscaling.minReplicas (%v) is above maxReplicas (%v)" $role $a.minReplicas $a.maxReplicas) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
The TriggerAuthentication KEDA's Kafka scaler uses: keda.authenticationRef, or
the chart's own when SASL or a TLS Secret needs credentials; empty otherwise.
*/}}
{{- define "recon-stream.kedaAuthentication" -}}
{{- if .Values.keda.authenticationRef -}}
{{- .Values.keda.authenticationRef -}}
{{- else if or (include "recon-stream.sasl" .) (and (include "recon-stream.kafkaTls" .) .Values.kafka.tls.existingSecret) -}}
{{- printf "%s-kafka" (include "recon-stream.fullname" .) -}}
{{- end -}}
{{- end -}}
