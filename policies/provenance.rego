# X-Provenance for automated clients (data: clients.<id>.automated: true, provenance_agent).
# The header must hold a Provenance whose agent names the client (provenance_agent.reference,
# or provenance_agent.identifier {system, value}) and whose target names every written resource:
# `Type/id` (optionally `/_history/n`) when the id is known, else a target of `type` Type with no
# reference (a create). The client also needs a Provenance create scope, since the EHR stores it.
package fhir.writeback

import rego.v1

# The X-Provenance header of an automated client's request, read once per decision:
# {"header": "missing" | "invalid" | "json", "value": the parsed JSON}; null for other clients.
# ctx: the input's context. The sidecar parses the header for the policy (context.x_provenance,
# README.md): parsing JSON is slow on the embedded engine. Without it, it is parsed here.
provenance_header(automated_client, headers, ctx) := null if {
	automated_client != true
} else := {"header": "missing"} if {
	not is_string(object.get(headers, "x-provenance", null))
} else := {"header": "json", "value": ctx.x_provenance.value} if {
	ctx.x_provenance.valid == true
} else := {"header": "invalid"} if {
	ctx.x_provenance.valid == false
} else := {"header": "invalid"} if {
	not json.is_valid(headers["x-provenance"])
} else := {"header": "json", "value": json.unmarshal(headers["x-provenance"])}

# automated_client: the client is automated; agent_setting: its provenance_agent; n: how many
# writes the request holds; prov: provenance_header(...).
provenance_request_checks(automated_client, agent_setting, client, n, prov) := ((((missing | invalid) | wrong_type) | no_agent) | agent) | scope if {
	automated_client == true
	n > 0
	missing := {{"rule": "provenance_missing"} | prov.header == "missing"}
	invalid := {{"rule": "provenance_invalid"} | prov.header == "invalid"}
	wrong_type := {{"rule": "provenance_type"} | prov.header == "json"; not is_provenance(prov.value)}
	no_agent := {{"rule": "provenance_no_agent"} | not expected_agent(agent_setting)}
	agent := {{"rule": "provenance_agent"} |
		p := provenance_of(prov)
		expected_agent(agent_setting)
		not agent_matches(agent_setting, object.get(p, "agent", []))
	}
	scope := {{"rule": "provenance_scope"} | not provenance_scope(object.get(client, "scopes", []))}
} else := set()

# t, id: the written type and id (per_write_denies: writeback.rego).
provenance_targets(t, id, prov) := {{"rule": "provenance_target"} |
	p := provenance_of(prov)
	is_string(t)
	not targeted(t, id, object.get(p, "target", []))
}

# The X-Provenance header as a Provenance resource (undefined otherwise).
provenance_of(prov) := prov.value if {
	prov.header == "json"
	is_provenance(prov.value)
}

is_provenance(p) if {
	is_object(p)
	p.resourceType == "Provenance"
}

# want: the client's provenance_agent setting; agents: the Provenance's agent list.
expected_agent(want) if is_string(want.reference)

expected_agent(want) if is_string(want.identifier.value)

agent_matches(want, agents) if {
	is_string(want.reference)
	some a in agents
	a.who.reference == want.reference
}

agent_matches(want, agents) if {
	is_string(want.identifier.value)
	some a in agents
	a.who.identifier.system == want.identifier.system
	a.who.identifier.value == want.identifier.value
}

# targets: the Provenance's target list.
targeted(t, id, targets) if {
	is_string(id)
	ref := concat("/", [t, id])
	some tg in targets
	tg.reference == ref
}

targeted(t, id, targets) if {
	is_string(id)
	prefix := concat("/", [t, id, "_history", ""])
	some tg in targets
	is_string(tg.reference)
	startswith(tg.reference, prefix)
}

targeted(t, id, targets) if {
	not is_string(id)
	some tg in targets
	tg.type == t
	not tg.reference
}

provenance_scope(scopes) if {
	some s in scopes
	is_string(s)
	regex.match(`^(system|patient|user)/(Provenance|\*)\.(c[ruds]*|write|\*)$`, s)
}

reason(r, _, cid, _) := concat("", ["X-Provenance header is required for automated client ", who(cid)]) if r.rule == "provenance_missing"

reason(r, _, _, _) := "X-Provenance is not valid JSON" if r.rule == "provenance_invalid"

reason(r, _, _, _) := "X-Provenance is not a Provenance resource" if r.rule == "provenance_type"

reason(r, _, cid, _) := concat("", ["no provenance agent is configured for automated client ", who(cid)]) if r.rule == "provenance_no_agent"

reason(r, _, cid, _) := concat("", ["X-Provenance agent does not name client ", who(cid)]) if r.rule == "provenance_agent"

reason(r, _, cid, _) := concat("", ["client ", who(cid), " needs a Provenance create scope to send X-Provenance"]) if r.rule == "provenance_scope"

reason(r, w, _, _) := concat("", [label(w), "X-Provenance does not target ", target(w)]) if r.rule == "provenance_target"
