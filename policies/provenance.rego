# X-Provenance for automated clients (data: clients.<id>.automated: true, provenance_agent).
# The header must hold a Provenance whose agent names the client (provenance_agent.reference,
# or provenance_agent.identifier {system, value}) and whose target names every written resource:
# `Type/id` (optionally `/_history/n`) when the id is known, else a target of `type` Type with no
# reference (a create). The client also needs a Provenance create scope, since the EHR stores it.
package fhir.writeback

import rego.v1

provenance_request_denies(inp, c) := provenance_checks(inp, c) if {
	automated(c)
} else := set()

provenance_checks(inp, c) := ((((missing | invalid) | wrong_type) | no_agent) | agent) | scope if {
	write_count(inp) > 0
	header := object.get(inp.request.headers, "x-provenance", null)
	missing := {msg |
		not is_string(header)
		msg := concat("", ["X-Provenance header is required for automated client ", who(inp)])
	}
	invalid := {msg |
		is_string(header)
		not json.is_valid(header)
		msg := "X-Provenance is not valid JSON"
	}
	wrong_type := {msg |
		is_string(header)
		json.is_valid(header)
		not is_provenance(json.unmarshal(header))
		msg := "X-Provenance is not a Provenance resource"
	}
	no_agent := {msg |
		not expected_agent(c)
		msg := concat("", ["no provenance agent is configured for automated client ", who(inp)])
	}
	agent := {msg |
		prov := provenance_of(inp)
		expected_agent(c)
		not agent_matches(c, prov)
		msg := concat("", ["X-Provenance agent does not name client ", who(inp)])
	}
	scope := {msg |
		not provenance_scope(inp)
		msg := concat("", ["client ", who(inp), " needs a Provenance create scope to send X-Provenance"])
	}
} else := set()

provenance_write_denies(inp, label, w, c) := provenance_targets(inp, label, w) if {
	automated(c)
} else := set()

provenance_targets(inp, label, w) := {msg |
	prov := provenance_of(inp)
	is_string(w.request.resource_type)
	not targeted(w, prov)
	msg := concat("", [label, "X-Provenance does not target ", target(w)])
}

# The X-Provenance header as a Provenance resource (undefined otherwise).
provenance_of(inp) := prov if {
	header := inp.request.headers["x-provenance"]
	is_string(header)
	json.is_valid(header)
	prov := json.unmarshal(header)
	is_provenance(prov)
}

is_provenance(p) if {
	is_object(p)
	p.resourceType == "Provenance"
}

expected_agent(c) if is_string(c.provenance_agent.reference)

expected_agent(c) if is_string(c.provenance_agent.identifier.value)

agent_matches(c, prov) if {
	want := c.provenance_agent.reference
	is_string(want)
	some a in prov.agent
	a.who.reference == want
}

agent_matches(c, prov) if {
	want := c.provenance_agent.identifier
	is_string(want.value)
	some a in prov.agent
	a.who.identifier.system == want.system
	a.who.identifier.value == want.value
}

targeted(w, prov) if {
	is_string(w.request.id)
	ref := concat("/", [w.request.resource_type, w.request.id])
	some tg in prov.target
	tg.reference == ref
}

targeted(w, prov) if {
	is_string(w.request.id)
	prefix := concat("/", [w.request.resource_type, w.request.id, "_history", ""])
	some tg in prov.target
	is_string(tg.reference)
	startswith(tg.reference, prefix)
}

targeted(w, prov) if {
	not is_string(w.request.id)
	some tg in prov.target
	tg.type == w.request.resource_type
	not tg.reference
}

provenance_scope(inp) if {
	some s in inp.client.scopes
	is_string(s)
	regex.match(`^(system|patient|user)/(Provenance|\*)\.(c[ruds]*|write|\*)$`, s)
}
