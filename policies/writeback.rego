# Starter write-back policy. Data (which client may write what) lives in data.json, not here.
package fhir.writeback

import rego.v1

clients := data.fhir_sidecar.clients

default decision := {"allow": false, "reasons": ["policy produced no decision"]}

decision := {"allow": count(deny) == 0, "reasons": sort([r | some r in deny])}

# The written resource types of this request: the request itself, or each writing entry.
written contains input.request.resource_type if {
	not input.entries
	input.request.write
	input.request.resource_type != null
}

written contains e.request.resource_type if {
	some e in input.entries
	e.request.write
	e.request.resource_type != null
}

deny contains "client has no policy entry" if {
	not clients[input.client.id]
}

deny contains sprintf("%s writes are not allowed for this client", [t]) if {
	some t in written
	entry := clients[input.client.id]
	not t in entry.write_types
}

deny contains sprintf("operation %s is not allowed by policy", [op]) if {
	op := input.request.operation
	op != null
	input.request.write
	not op in object.get(clients[input.client.id], "operations", [])
}
