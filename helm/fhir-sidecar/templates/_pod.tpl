{{/* The pod template shared by the Deployment and the StatefulSet. */}}

{{/* A hardened container securityContext for a non-root UID (dict "uid" "gid" "readOnly"). */}}
{{- define "fhir-sidecar.securityContext" -}}
runAsNonRoot: true
runAsUser: {{ int .uid }}
runAsGroup: {{ int .gid }}
readOnlyRootFilesystem: {{ .readOnly }}
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "fhir-sidecar.pod" -}}
{{- $v := .Values -}}
{{- $native := include "fhir-sidecar.nativeSidecar" . -}}
{{- $gateway := eq $v.mode "gateway" -}}
metadata:
  labels:
    {{- include "fhir-sidecar.selectorLabels" . | nindent 4 }}
    {{- with $v.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    # Restart on a config or policy change. The kill switch is deliberately not here.
    checksum/config: {{ include "fhir-sidecar.config" . | sha256sum }}
    checksum/policies: {{ include "fhir-sidecar.policyFiles" . | sha256sum }}
    {{- with $v.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "fhir-sidecar.serviceAccountName" . }}
  # No container gets the API token; Vault Kubernetes auth gets a projected token in the
  # fhir-sidecar container alone (volume sa-token).
  automountServiceAccountToken: false
  enableServiceLinks: false
  shareProcessNamespace: false
  hostNetwork: false
  hostPID: false
  hostIPC: false
  terminationGracePeriodSeconds: {{ int $v.sidecar.terminationGracePeriodSeconds }}
  securityContext:
    runAsNonRoot: true
    fsGroup: {{ int $v.sidecar.gid }}
    fsGroupChangePolicy: OnRootMismatch
    seccompProfile:
      type: RuntimeDefault
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with $v.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- $init := list -}}
  {{- if eq $v.mode "sidecar" }}{{ $init = append $init "interception" }}{{ end -}}
  {{- if include "fhir-sidecar.needsCA" . }}{{ $init = append $init "ca-setup" }}{{ end -}}
  {{- if $native }}
    {{- if $v.opa.enabled }}{{ $init = append $init "opa" }}{{ end -}}
    {{- $init = append $init "fhir-sidecar" -}}
  {{- end }}
  {{- if $init }}
  initContainers:
    {{- range $init }}
    {{- include (printf "fhir-sidecar.container.%s" .) $ | nindent 4 }}
    {{- end }}
  {{- end }}
  containers:
    {{- if not $gateway }}
    {{- include "fhir-sidecar.container.app" . | nindent 4 }}
    {{- end }}
    {{- if not $native }}
    {{- include "fhir-sidecar.container.fhir-sidecar" . | nindent 4 }}
    {{- if $v.opa.enabled }}
    {{- include "fhir-sidecar.container.opa" . | nindent 4 }}
    {{- end }}
    {{- end }}
  volumes:
    {{- include "fhir-sidecar.volumes" . | nindent 4 }}
{{- end -}}

{{/* ---------- containers ---------- */}}

{{- define "fhir-sidecar.container.interception" -}}
{{- $v := .Values -}}
{{- $dests := list -}}
{{- range $cidr := $v.ehr.cidrs }}{{ range $port := fromJsonArray (include "fhir-sidecar.ehrPorts" $) }}{{ $dests = append $dests (printf "%s:%d" $cidr (int $port)) }}{{ end }}{{ end -}}
{{- $protected := list (int $v.ports.admin) -}}
{{- if $v.opa.enabled }}{{ $protected = append $protected (int $v.opa.port) }}{{ end -}}
{{- $appEgress := list -}}
{{- range $e := $v.app.egress }}{{ range $port := $e.ports }}{{ $appEgress = append $appEgress (printf "%s:%d/%s" $e.cidr (int $port) (lower (default "TCP" $e.protocol))) }}{{ end }}{{ end -}}
{{- $bin := ternary "iptables-nft" "iptables-legacy" (eq $v.interception.backend "nft") -}}
{{- $bin6 := ternary "ip6tables-nft" "ip6tables-legacy" (eq $v.interception.backend "nft") -}}
- name: interception
  image: {{ include "fhir-sidecar.image" . }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  command:
    - /bin/sh
    - -c
    - |
      {{- .Files.Get "files/interception.sh" | nindent 6 }}
  env:
    - {name: SIDECAR_UID, value: {{ int $v.sidecar.uid | quote }}}
    - {name: APP_UID, value: {{ int $v.app.uid | quote }}}
    - {name: PROXY_PORT, value: {{ int $v.ports.proxy | quote }}}
    - {name: EHR_DESTINATIONS, value: {{ join " " $dests | quote }}}
    - {name: PROTECTED_PORTS, value: {{ join " " $protected | quote }}}
    - {name: DNS_SERVERS, value: {{ ternary (join " " ($v.interception.dnsServers | default list)) "none" $v.interception.allowDNS | quote }}}
    - {name: APP_EGRESS, value: {{ join " " $appEgress | quote }}}
    - {name: IPTABLES, value: {{ $bin }}}
    - {name: IP6TABLES, value: {{ $bin6 }}}
  securityContext:
    # Root with NET_ADMIN (and NET_RAW for iptables-legacy), in this init container only: it
    # changes the pod's network namespace and exits before the app starts.
    runAsNonRoot: false
    runAsUser: 0
    runAsGroup: 0
    readOnlyRootFilesystem: true
    allowPrivilegeEscalation: false
    privileged: false
    capabilities:
      drop: [ALL]
      add: {{ ternary (list "NET_ADMIN") (list "NET_ADMIN" "NET_RAW") (eq $v.interception.backend "nft") | toJson }}
    seccompProfile:
      type: RuntimeDefault
  resources:
    {{- toYaml $v.interception.resources | nindent 4 }}
  volumeMounts:
    - {name: xtables-run, mountPath: /run}
{{- end -}}

{{- define "fhir-sidecar.container.ca-setup" -}}
{{- $v := .Values -}}
- name: ca-setup
  image: {{ include "fhir-sidecar.image" . }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  command:
    - /bin/sh
    - -c
    - |
      {{- .Files.Get "files/ca-setup.sh" | nindent 6 }}
  env:
    - {name: CONFDIR, value: /var/lib/mitmproxy}
    {{- if $v.ca.existingSecret }}
    - {name: CA_SECRET_DIR, value: /var/run/secrets/fhir-sidecar-ca}
    {{- end }}
    {{- if include "fhir-sidecar.appNeedsBundle" . }}
    - {name: BUNDLE_DIR, value: /etc/fhir-sidecar-ca}
    - {name: SYSTEM_CA_FILE, value: /etc/ssl/certs/ca-certificates.crt}
    {{- end }}
  securityContext:
    {{- include "fhir-sidecar.securityContext" (dict "uid" $v.sidecar.uid "gid" $v.sidecar.gid "readOnly" true) | nindent 4 }}
  resources:
    requests: {cpu: 50m, memory: 64Mi}
    limits: {cpu: 500m, memory: 128Mi}
  volumeMounts:
    - {name: confdir, mountPath: /var/lib/mitmproxy}
    {{- if $v.ca.existingSecret }}
    - {name: ca-secret, mountPath: /var/run/secrets/fhir-sidecar-ca, readOnly: true}
    {{- end }}
    {{- if include "fhir-sidecar.appNeedsBundle" . }}
    - {name: ca-bundle, mountPath: /etc/fhir-sidecar-ca}
    {{- end }}
{{- end -}}

{{- define "fhir-sidecar.container.fhir-sidecar" -}}
{{- $v := .Values -}}
- name: fhir-sidecar
  image: {{ include "fhir-sidecar.image" . }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  args: [run, --config, /etc/fhir-sidecar/config/config.yaml, --log-level, {{ $v.sidecar.logLevel | quote }}, --workers, {{ int ($v.sidecar.workers | default 1) | quote }}]
  {{- if include "fhir-sidecar.nativeSidecar" . }}
  # A native sidecar: started (and ready) before the app, stopped after it.
  restartPolicy: Always
  {{- end }}
  ports:
    {{- if eq $v.mode "gateway" }}
    - {name: proxy, containerPort: {{ int $v.ports.proxy }}, protocol: TCP}
    {{- end }}
    - {name: admin, containerPort: {{ int $v.ports.admin }}, protocol: TCP}
  {{- with $v.sidecar.env }}
  env:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- include "fhir-sidecar.securityContext" (dict "uid" $v.sidecar.uid "gid" $v.sidecar.gid "readOnly" true) | nindent 4 }}
  resources:
    {{- toYaml $v.sidecar.resources | nindent 4 }}
  startupProbe:
    httpGet: {path: /readyz, port: admin}
    periodSeconds: 1
    failureThreshold: 120
  livenessProbe:
    httpGet: {path: /healthz, port: admin}
    periodSeconds: 10
    timeoutSeconds: 3
    failureThreshold: 3
  readinessProbe:
    httpGet: {path: /readyz, port: admin}
    periodSeconds: 5
    timeoutSeconds: 3
    failureThreshold: 2
  lifecycle:
    preStop:
      # Let endpoints and load balancers forget the pod; then SIGTERM drains in-flight requests.
      exec:
        command: ["/bin/sleep", {{ int $v.sidecar.preStopSleepSeconds | quote }}]
  volumeMounts:
    - {name: config, mountPath: /etc/fhir-sidecar/config, readOnly: true}
    - {name: policies, mountPath: /etc/fhir-sidecar/policies, readOnly: true}
    - {name: data, mountPath: /var/lib/fhir-sidecar}
    {{- if eq $v.killSwitch.source "configMap" }}
    - {name: killswitch, mountPath: /etc/fhir-sidecar/killswitch, readOnly: true}
    {{- end }}
    - {name: sidecar-tmp, mountPath: /tmp}
    - {name: confdir, mountPath: /var/lib/mitmproxy}
    {{- if $v.secrets.existingSecret }}
    - {name: secrets, mountPath: /var/run/secrets/fhir-sidecar, readOnly: true}
    {{- end }}
    {{- if and (eq $v.mode "gateway") (eq $v.gateway.listenMode "reverse") }}
    - {name: listen-tls, mountPath: /var/run/secrets/fhir-sidecar-tls, readOnly: true}
    {{- end }}
    {{- if include "fhir-sidecar.vaultKubernetesAuth" . }}
    - {name: sa-token, mountPath: /var/run/secrets/kubernetes.io/serviceaccount, readOnly: true}
    {{- end }}
    {{- with $v.sidecar.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}

{{- define "fhir-sidecar.container.opa" -}}
{{- $v := .Values -}}
- name: opa
  image: {{ $v.opa.image }}
  imagePullPolicy: {{ $v.opa.imagePullPolicy }}
  args:
    - run
    - --server
    # Loopback only; OPA's API authorization (files/opa-authz.rego) refuses every write API.
    - --addr=127.0.0.1:{{ int $v.opa.port }}
    - --diagnostic-addr=0.0.0.0:{{ int $v.opa.diagnosticPort }}
    - --authorization=basic
    - --disable-telemetry
    - --ignore=.*
    - --log-level=error
    - /policies
    - /authz
  {{- if include "fhir-sidecar.nativeSidecar" . }}
  restartPolicy: Always
  {{- end }}
  ports:
    - {name: opa-diag, containerPort: {{ int $v.opa.diagnosticPort }}, protocol: TCP}
  securityContext:
    {{- include "fhir-sidecar.securityContext" (dict "uid" $v.opa.uid "gid" $v.opa.uid "readOnly" true) | nindent 4 }}
  resources:
    {{- toYaml $v.opa.resources | nindent 4 }}
  startupProbe:
    httpGet: {path: /health, port: opa-diag}
    periodSeconds: 1
    failureThreshold: 60
  livenessProbe:
    httpGet: {path: /health, port: opa-diag}
    periodSeconds: 10
  readinessProbe:
    httpGet: {path: /health, port: opa-diag}
    periodSeconds: 5
  volumeMounts:
    - {name: policies, mountPath: /policies, readOnly: true}
    - {name: opa-authz, mountPath: /authz, readOnly: true}
{{- end -}}

{{- define "fhir-sidecar.container.app" -}}
{{- $v := .Values -}}
{{- $a := $v.app -}}
- name: {{ $a.name }}
  image: {{ $a.image }}
  imagePullPolicy: {{ $a.imagePullPolicy }}
  {{- with $a.command }}
  command:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $a.args }}
  args:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  env:
    {{- if eq $v.mode "reverse" }}
    # NON-ENFORCING (reverse mode): the app is pointed at the sidecar, not confined to it.
    - {name: {{ $a.fhirBaseUrlEnv }}, value: {{ printf "http://127.0.0.1:%d%s" (int $v.ports.proxy) (include "fhir-sidecar.basePath" .) | quote }}}
    {{- end }}
    {{- if eq $v.mode "forward" }}
    # NON-ENFORCING (forward mode): the app is pointed at the sidecar, not confined to it.
    {{- range list "HTTPS_PROXY" "https_proxy" }}
    - {name: {{ . }}, value: {{ printf "http://127.0.0.1:%d" (int $v.ports.proxy) | quote }}}
    {{- end }}
    {{- range list "NO_PROXY" "no_proxy" }}
    - {name: {{ . }}, value: {{ $a.noProxy | quote }}}
    {{- end }}
    {{- end }}
    {{- if include "fhir-sidecar.appNeedsBundle" . }}
    {{- range $a.caBundleEnv }}
    - {name: {{ . }}, value: /etc/fhir-sidecar-ca/ca-bundle.pem}
    {{- end }}
    {{- end }}
    {{- with $a.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $a.envFrom }}
  envFrom:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $a.ports }}
  ports:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    # Non-root, another UID than the sidecar's, no capabilities, no privilege escalation: the app
    # can never become the sidecar's UID, which the iptables rules trust.
    {{- include "fhir-sidecar.securityContext" (dict "uid" $a.uid "gid" $a.gid "readOnly" $a.readOnlyRootFilesystem) | nindent 4 }}
  resources:
    {{- toYaml $a.resources | nindent 4 }}
  {{- range $probe := list "livenessProbe" "readinessProbe" "startupProbe" }}
  {{- with get $a $probe }}
  {{ $probe }}:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- end }}
  volumeMounts:
    {{- if $a.tmpDir }}
    - {name: app-tmp, mountPath: /tmp}
    {{- end }}
    {{- if include "fhir-sidecar.appNeedsBundle" . }}
    - {name: ca-bundle, mountPath: /etc/fhir-sidecar-ca, readOnly: true}
    {{- end }}
    {{- with $a.volumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}

{{/* ---------- volumes ---------- */}}

{{- define "fhir-sidecar.volumes" -}}
{{- $v := .Values -}}
{{- $fullname := include "fhir-sidecar.fullname" . -}}
- name: config
  configMap:
    name: {{ $fullname }}-config
- name: policies
  configMap:
    name: {{ default (printf "%s-policies" $fullname) $v.policies.existingConfigMap }}
{{- if eq $v.killSwitch.source "configMap" }}
- name: killswitch
  configMap:
    name: {{ $fullname }}-killswitch
    items:
      - {key: killswitch, path: killswitch}
      {{- range (include "fhir-sidecar.clientIds" . | fromJsonArray) }}
      - {key: {{ printf "client.%s" . | quote }}, path: {{ printf "killswitch.clients/%s" . | quote }}}
      {{- end }}
{{- end }}
{{- if not (include "fhir-sidecar.statefulSet" .) }}
- name: data
  {{- if $v.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ $fullname }}-data
  {{- else }}
  # persistence.enabled=false: the audit trail is lost with the pod. Not for production.
  emptyDir: {}
  {{- end }}
{{- end }}
- name: sidecar-tmp
  emptyDir:
    sizeLimit: 64Mi
- name: confdir
  # mitmproxy's confdir: the CA and its key, in memory, mounted by the sidecar (and ca-setup) only.
  emptyDir:
    medium: Memory
    sizeLimit: 1Mi
{{- if $v.ca.existingSecret }}
- name: ca-secret
  secret:
    secretName: {{ $v.ca.existingSecret }}
    defaultMode: 0440
    items:
      - {key: tls.crt, path: tls.crt}
      - {key: tls.key, path: tls.key}
{{- end }}
{{- if include "fhir-sidecar.appNeedsBundle" . }}
- name: ca-bundle
  # The app's combined CA bundle (system roots + the sidecar CA certificate; no key).
  emptyDir:
    sizeLimit: 2Mi
{{- end }}
{{- if $v.secrets.existingSecret }}
- name: secrets
  secret:
    secretName: {{ $v.secrets.existingSecret }}
    defaultMode: 0440
{{- end }}
{{- if and (eq $v.mode "gateway") (eq $v.gateway.listenMode "reverse") }}
- name: listen-tls
  secret:
    secretName: {{ $v.gateway.tls.existingSecret }}
    defaultMode: 0440
{{- end }}
{{- if include "fhir-sidecar.vaultKubernetesAuth" . }}
- name: sa-token
  # Vault Kubernetes auth: a short-lived token for the `{{ $v.vault.tokenAudience }}` audience,
  # mounted into the fhir-sidecar container alone.
  projected:
    defaultMode: 0440
    sources:
      - serviceAccountToken:
          audience: {{ $v.vault.tokenAudience }}
          expirationSeconds: {{ int $v.vault.tokenExpirationSeconds }}
          path: token
{{- end }}
{{- if $v.opa.enabled }}
- name: opa-authz
  configMap:
    name: {{ $fullname }}-opa-authz
{{- end }}
{{- if eq $v.mode "sidecar" }}
- name: xtables-run
  emptyDir:
    medium: Memory
    sizeLimit: 1Mi
{{- end }}
{{- if and (ne $v.mode "gateway") $v.app.tmpDir }}
- name: app-tmp
  emptyDir:
    sizeLimit: 256Mi
{{- end }}
{{- with $v.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}
