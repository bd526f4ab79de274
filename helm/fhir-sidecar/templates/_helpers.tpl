{{/* ---------- names and labels ---------- */}}

{{- define "fhir-sidecar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fhir-sidecar.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "fhir-sidecar.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "fhir-sidecar.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "fhir-sidecar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fhir-sidecar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "fhir-sidecar.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "fhir-sidecar.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: {{ .Values.mode }}
{{- end -}}

{{- define "fhir-sidecar.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "fhir-sidecar.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "fhir-sidecar.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* ---------- what the mode implies ---------- */}}

{{/* The sidecar's listen.mode. */}}
{{- define "fhir-sidecar.listenMode" -}}
{{- $m := .Values.mode -}}
{{- if eq $m "sidecar" }}transparent
{{- else if eq $m "gateway" }}{{ .Values.gateway.listenMode }}
{{- else }}{{ $m }}
{{- end -}}
{{- end -}}

{{/* "true" when the sidecar terminates the app's TLS with its own CA. */}}
{{- define "fhir-sidecar.needsCA" -}}
{{- if has (include "fhir-sidecar.listenMode" .) (list "forward" "transparent") }}true{{ end -}}
{{- end -}}

{{/* "true" when the app runs in this pod and needs the combined CA bundle. */}}
{{- define "fhir-sidecar.appNeedsBundle" -}}
{{- if has .Values.mode (list "sidecar" "forward") }}true{{ end -}}
{{- end -}}

{{/* "true" when the sidecar runs as a native sidecar (an initContainer that keeps running). */}}
{{- define "fhir-sidecar.nativeSidecar" -}}
{{- if and .Values.sidecar.native (ne .Values.mode "gateway") }}true{{ end -}}
{{- end -}}

{{/* "true" when the audit volume comes from volumeClaimTemplates (a StatefulSet). */}}
{{- define "fhir-sidecar.statefulSet" -}}
{{- if and .Values.persistence.enabled (gt (int .Values.replicas) 1) }}true{{ end -}}
{{- end -}}

{{/* The EHR's ports: ehr.ports, or the port of config.upstream.url. JSON list. */}}
{{- define "fhir-sidecar.ehrPorts" -}}
{{- $ports := list -}}
{{- range .Values.ehr.ports }}{{ $ports = append $ports (int .) }}{{ end -}}
{{- if not $ports -}}
{{- $u := urlParse (include "fhir-sidecar.upstreamUrl" .) -}}
{{- $hp := splitList ":" $u.host -}}
{{- if gt (len $hp) 1 }}{{ $ports = list (int (last $hp)) }}
{{- else if eq $u.scheme "http" }}{{ $ports = list 80 }}
{{- else }}{{ $ports = list 443 }}
{{- end -}}
{{- end -}}
{{- toJson $ports -}}
{{- end -}}

{{- define "fhir-sidecar.upstreamUrl" -}}
{{- $up := (.Values.config | default dict).upstream | default dict -}}
{{- required "config.upstream.url is required: the EHR's FHIR base URL" $up.url -}}
{{- end -}}

{{/* The upstream base path without a trailing slash ("" at the root). */}}
{{- define "fhir-sidecar.basePath" -}}
{{- (urlParse (include "fhir-sidecar.upstreamUrl" .)).path | trimSuffix "/" -}}
{{- end -}}

{{/* ---------- secret references ---------- */}}

{{/* Fails unless .value is a secret reference. The message names the key, never the value. */}}
{{- define "fhir-sidecar.requireRef" -}}
{{- if not (and (kindIs "string" .value) (regexMatch "^(env:[A-Za-z_][A-Za-z0-9_]*|file:.+|vault:[A-Za-z0-9_./-]+#[A-Za-z0-9_.-]+)$" .value)) -}}
{{- fail (printf "config.%s must be a secret reference (env:NAME, file:PATH or vault:PATH#field), never the secret itself: the chart renders no inline secret" .path) -}}
{{- end -}}
{{- end -}}

{{/*
Walks the config: every secret-bearing key must hold a reference, and no URL may carry a password.
Called with (dict "path" "config path so far" "value" value).
*/}}
{{- define "fhir-sidecar.checkRefs" -}}
{{- $secretKeys := list "token" "key" "pseudonym_key" "client_secret" "password" "private_key" "secret_id" "release_credentials" "upstream_credentials" "cert" -}}
{{- $path := .path -}}
{{- if kindIs "map" .value -}}
  {{- range $k, $v := .value -}}
    {{- $p := ternary $k (printf "%s.%s" $path $k) (eq $path "") -}}
    {{- if and (has $k $secretKeys) (not (kindIs "map" $v)) -}}
      {{- include "fhir-sidecar.requireRef" (dict "path" $p "value" $v) -}}
    {{- else if and (eq $k "keys") (kindIs "map" $v) -}}
      {{- range $kid, $kv := $v -}}
        {{- include "fhir-sidecar.requireRef" (dict "path" (printf "%s.%s" $p $kid) "value" $kv) -}}
      {{- end -}}
    {{- else -}}
      {{- include "fhir-sidecar.checkRefs" (dict "path" $p "value" $v) -}}
    {{- end -}}
  {{- end -}}
{{- else if kindIs "slice" .value -}}
  {{- range $i, $v := .value -}}
    {{- include "fhir-sidecar.checkRefs" (dict "path" (printf "%s[%d]" $path $i) "value" $v) -}}
  {{- end -}}
{{- else if and (kindIs "string" .value) (contains "://" .value) -}}
  {{- if contains ":" (urlParse .value).userinfo -}}
    {{- fail (printf "config.%s: a URL must not carry a password; use the matching secret reference key (e.g. state.password)" $path) -}}
  {{- end -}}
{{- end -}}
{{- end -}}

{{/* ---------- the sidecar's config ---------- */}}

{{- define "fhir-sidecar.config" -}}
{{- $v := .Values -}}
{{- $c := deepCopy ($v.config | default dict) -}}
{{- include "fhir-sidecar.checkRefs" (dict "path" "" "value" $c) -}}
{{- $_ := include "fhir-sidecar.upstreamUrl" . -}}
{{- /* keys the chart owns: a value set there would be silently replaced, so it is refused */ -}}
{{- if hasKey $c "listen" -}}
{{- fail "config.listen is set by the chart (from mode, ports.proxy, ca and gateway.tls): remove it" -}}
{{- end -}}
{{- range $section, $keys := dict "admin" (list "host" "port") "killswitch" (list "file") "audit" (list "path") "policy" (list "dir" "opa_url") -}}
{{- range $k := $keys -}}
{{- if hasKey (get $c $section | default dict) $k -}}
{{- fail (printf "config.%s.%s is set by the chart: remove it (see the chart's README)" $section $k) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- /* listen */ -}}
{{- $mode := include "fhir-sidecar.listenMode" . -}}
{{- /* mitmproxy always wants a writable confdir (it makes a CA there when none is given) */ -}}
{{- $listen := dict "mode" $mode "port" (int $v.ports.proxy) "host" (ternary "0.0.0.0" "127.0.0.1" (eq $v.mode "gateway")) "confdir" "/var/lib/mitmproxy" -}}
{{- if and (eq $v.mode "gateway") (eq $mode "reverse") -}}
{{- $_ := set $listen "tls" (dict "cert" "file:/var/run/secrets/fhir-sidecar-tls/tls.crt" "key" "file:/var/run/secrets/fhir-sidecar-tls/tls.key") -}}
{{- end -}}
{{- $_ := set $c "listen" $listen -}}
{{- /* admin: on the pod IP for the probes, so always behind a token */ -}}
{{- $admin := get $c "admin" | default dict -}}
{{- $_ := set $admin "host" "0.0.0.0" -}}
{{- $_ := set $admin "port" (int $v.ports.admin) -}}
{{- if not $admin.token -}}
{{- if $v.secrets.existingSecret -}}
{{- $_ := set $admin "token" "file:/var/run/secrets/fhir-sidecar/admin-token" -}}
{{- else -}}
{{- fail "the admin listener answers on the pod IP (for the probes), so it needs admin.token: set secrets.existingSecret (key admin-token) or config.admin.token (a secret reference)" -}}
{{- end -}}
{{- end -}}
{{- $_ := set $c "admin" $admin -}}
{{- /* kill switch, audit, policy, state */ -}}
{{- $ks := get $c "killswitch" | default dict -}}
{{- $_ := set $ks "file" (include "fhir-sidecar.killSwitchFile" .) -}}
{{- $_ := set $c "killswitch" $ks -}}
{{- $audit := get $c "audit" | default dict -}}
{{- $_ := set $audit "path" "/var/lib/fhir-sidecar/audit.jsonl" -}}
{{- $_ := set $c "audit" $audit -}}
{{- $policy := get $c "policy" | default dict -}}
{{- $_ := set $policy "dir" "/etc/fhir-sidecar/policies" -}}
{{- if $v.opa.enabled -}}
{{- $_ := set $policy "engine" "opa" -}}
{{- $_ := set $policy "opa_url" (printf "http://127.0.0.1:%d" (int $v.opa.port)) -}}
{{- else if eq (toString $policy.engine) "opa" -}}
{{- fail "config.policy.engine opa needs opa.enabled (the chart runs OPA in the pod)" -}}
{{- end -}}
{{- $_ := set $c "policy" $policy -}}
{{- $state := get $c "state" | default dict -}}
{{- if not $state.store -}}
{{- $_ := set $state "store" "sqlite:/var/lib/fhir-sidecar/state.db" -}}
{{- else if not (hasPrefix "redis" $state.store) -}}
{{- fail "config.state.store: the chart keeps the sqlite store on the audit volume; set it only for redis:// (or rediss://)" -}}
{{- end -}}
{{- $_ := set $c "state" $state -}}
{{- toYaml $c -}}
{{- end -}}

{{- define "fhir-sidecar.policyPath" -}}
{{- (get ((.Values.config | default dict).policy | default dict) "path") | default "fhir/writeback" -}}
{{- end -}}

{{- define "fhir-sidecar.killSwitchFile" -}}
{{- if eq .Values.killSwitch.source "configMap" -}}
/etc/fhir-sidecar/killswitch/killswitch
{{- else -}}
{{- /* on the audit volume: an engaged switch stays engaged when the pod is replaced */ -}}
/var/lib/fhir-sidecar/killswitch
{{- end -}}
{{- end -}}

{{/* "true" when the config uses Redis for state. */}}
{{- define "fhir-sidecar.usesRedis" -}}
{{- $state := (.Values.config | default dict).state | default dict -}}
{{- if hasPrefix "redis" (toString $state.store) }}true{{ end -}}
{{- end -}}

{{/* "true" when the config makes the sidecar call an identity provider (JWKS over https, introspection, token endpoint). */}}
{{- define "fhir-sidecar.usesIdentity" -}}
{{- $c := .Values.config | default dict -}}
{{- $id := $c.identity | default dict -}}
{{- $uses := or (hasPrefix "https://" (toString $id.jwks)) (hasPrefix "http://" (toString $id.jwks)) $id.introspection -}}
{{- range $c.clients | default list -}}
{{- if and (kindIs "map" .upstream_credentials) (.upstream_credentials | default dict).token_url -}}{{ $uses = true }}{{- end -}}
{{- end -}}
{{- if $uses }}true{{ end -}}
{{- end -}}

{{/* "true" when the config reads secrets from Vault with Kubernetes auth. */}}
{{- define "fhir-sidecar.vaultKubernetesAuth" -}}
{{- $vault := (.Values.config | default dict).vault | default dict -}}
{{- if eq (toString $vault.auth) "kubernetes" }}true{{ end -}}
{{- end -}}

{{/* The client ids of the config, as a JSON list. */}}
{{- define "fhir-sidecar.clientIds" -}}
{{- $ids := list -}}
{{- range ((.Values.config | default dict).clients | default list) }}{{ $ids = append $ids (toString .id) }}{{ end -}}
{{- toJson $ids -}}
{{- end -}}

{{/* A NetworkPolicy egress rule from {cidrs: [...], to: [peers], ports: [...], protocol: TCP}. */}}
{{- define "fhir-sidecar.egressRule" -}}
- to:
    {{- range .cidrs }}
    - ipBlock: {cidr: {{ . }}}
    {{- end }}
    {{- with .to }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .ports }}
  ports:
    {{- range . }}
    - {port: {{ int . }}, protocol: {{ default "TCP" $.protocol }}}
    {{- end }}
  {{- end }}
{{- end -}}
