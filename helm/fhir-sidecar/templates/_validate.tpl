{{/* Refuses values that would deploy something unsafe or broken. Rendered once, by the workload. */}}
{{- define "fhir-sidecar.validate" -}}
{{- $v := .Values -}}
{{- /* secrets first: an inline secret is the error to report, whatever else is wrong */ -}}
{{- include "fhir-sidecar.checkRefs" (dict "path" "" "value" ($v.config | default dict)) -}}
{{- $ehrCidrs := $v.ehr.cidrs | default list -}}

{{- if ne $v.mode "gateway" -}}
{{- if not $v.app.image -}}
{{- fail (printf "app.image is required in mode %s (the app container that runs beside the sidecar)" $v.mode) -}}
{{- end -}}
{{- if eq (int $v.app.uid) (int $v.sidecar.uid) -}}
{{- fail "app.uid must differ from sidecar.uid: the sidecar's UID is the one allowed to reach the EHR" -}}
{{- end -}}
{{- end -}}

{{- if and $v.opa.enabled (or (eq (int $v.opa.uid) (int $v.sidecar.uid)) (and (ne $v.mode "gateway") (eq (int $v.opa.uid) (int $v.app.uid)))) -}}
{{- fail "opa.uid must differ from sidecar.uid and app.uid" -}}
{{- end -}}

{{- if eq $v.mode "sidecar" -}}
{{- if not $ehrCidrs -}}
{{- fail "ehr.cidrs is required in sidecar mode: the iptables rules redirect the app's traffic to these addresses" -}}
{{- end -}}
{{- range $ehrCidrs -}}
{{- if contains ":" . -}}
{{- fail "ehr.cidrs: sidecar mode redirects IPv4 only (the app's IPv6 egress is refused); give the EHR's IPv4 addresses" -}}
{{- end -}}
{{- end -}}
{{- range $v.app.egress -}}
{{- if contains ":" (toString .cidr) -}}
{{- fail "app.egress: only IPv4 CIDRs in sidecar mode (the app's IPv6 egress is refused)" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- if eq $v.mode "gateway" -}}
{{- if not $v.gateway.apps.namespace -}}
{{- fail "gateway.apps.namespace is required: the namespace of the apps whose egress goes only to the gateway" -}}
{{- end -}}
{{- if and (eq $v.gateway.listenMode "forward") (not $v.ca.existingSecret) -}}
{{- fail "gateway.listenMode forward needs ca.existingSecret: the apps must trust the gateway's CA ahead of time" -}}
{{- end -}}
{{- if and (eq $v.gateway.listenMode "reverse") (not $v.gateway.tls.existingSecret) -}}
{{- fail "gateway.listenMode reverse needs gateway.tls.existingSecret: the listener is off loopback, so it serves TLS" -}}
{{- end -}}
{{- if and (gt (int $v.replicas) 1) (not (include "fhir-sidecar.usesRedis" .)) -}}
{{- fail "a gateway with replicas > 1 needs shared state (config.state.store: redis://...): an app's retry may land on another replica, and idempotency receipts and the kill switch must be shared" -}}
{{- end -}}
{{- end -}}

{{- if $v.networkPolicy.enabled -}}
{{- if not $ehrCidrs -}}
{{- fail "ehr.cidrs is required with networkPolicy.enabled: the policy allows egress to these addresses only" -}}
{{- end -}}
{{- $e := $v.networkPolicy.egress -}}
{{- if and (.Values.config | default dict).vault (not (or $e.vault.cidrs $e.vault.to)) -}}
{{- fail "config.vault is set: networkPolicy.egress.vault must say where Vault is ({cidrs: [...], ports: [8200]})" -}}
{{- end -}}
{{- if and (include "fhir-sidecar.usesRedis" .) (not (or $e.redis.cidrs $e.redis.to)) -}}
{{- fail "config.state.store is Redis: networkPolicy.egress.redis must say where it is ({to: [...], ports: [6379]})" -}}
{{- end -}}
{{- if and (include "fhir-sidecar.usesIdentity" .) (not (or $e.identity.cidrs $e.identity.to)) -}}
{{- fail "the config calls an identity provider (JWKS URL, introspection or token endpoint): networkPolicy.egress.identity must say where it is" -}}
{{- end -}}
{{- end -}}

{{- range $v.sidecar.env -}}
{{- if hasKey . "value" -}}
{{- fail "sidecar.env: use valueFrom (secretKeyRef) only: values never hold the sidecar's secrets" -}}
{{- end -}}
{{- end -}}

{{- $ids := include "fhir-sidecar.clientIds" . | fromJsonArray -}}
{{- range $id, $on := $v.killSwitch.clients -}}
{{- if not (has $id $ids) -}}
{{- fail (printf "killSwitch.clients: %q is not a client of config.clients" $id) -}}
{{- end -}}
{{- end -}}
{{- end -}}
