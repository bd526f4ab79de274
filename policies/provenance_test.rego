# Tests for provenance.rego (helpers in writeback_test.rego).
package fhir.writeback_test

import rego.v1

prov(agent_who, targets) := json.marshal({"resourceType": "Provenance", "target": targets, "agent": [{"who": agent_who}]})

lab_device := {"reference": "Device/legacy-lab-feed"}

lab_create(header_value, scopes) := {
	"client": client("legacy-lab-feed", "lab", scopes), "context": ctx,
	"request": req("POST", "create", "Observation", null, {"x-provenance": header_value}),
	"resource": tagged(obs, "lab"),
}

lab_scopes := ["system/Observation.c", "system/Provenance.c"]

test_automated_create_with_provenance if {
	decide(lab_create(prov(lab_device, [{"type": "Observation"}]), lab_scopes)).allow
}

test_automated_client_needs_the_header if {
	d := decide({
		"client": client("legacy-lab-feed", "lab", lab_scopes), "context": ctx,
		"request": req("POST", "create", "Observation", null, {}), "resource": tagged(obs, "lab"),
	})
	d.reasons == ["X-Provenance header is required for automated client legacy-lab-feed"]
}

test_provenance_must_be_json if {
	d := decide(lab_create("{not json", lab_scopes))
	d.reasons == ["X-Provenance is not valid JSON"]
}

test_provenance_must_be_a_provenance if {
	d := decide(lab_create(json.marshal({"resourceType": "AuditEvent"}), lab_scopes))
	d.reasons == ["X-Provenance is not a Provenance resource"]
	d2 := decide(lab_create("[1, 2]", lab_scopes))
	d2.reasons == ["X-Provenance is not a Provenance resource"]
}

test_provenance_agent_must_name_the_client if {
	d := decide(lab_create(prov({"reference": "Device/someone-else"}, [{"type": "Observation"}]), lab_scopes))
	d.reasons == ["X-Provenance agent does not name client legacy-lab-feed"]
}

test_provenance_agent_by_identifier if {
	bot := client("refill-bot", "t1", ["system/MedicationRequest.cu", "system/Provenance.c"])
	mr := tagged({"resourceType": "MedicationRequest", "status": "active"}, "t1")
	ident := {"identifier": {"system": "https://fhir-sidecar.dev/clients", "value": "refill-bot"}}
	header := prov(ident, [{"type": "MedicationRequest"}])
	inp := {"client": bot, "context": object.union(ctx, {"approvals": ["Practitioner/1"]}), "resource": mr,
		"request": req("POST", "create", "MedicationRequest", null, {"x-provenance": header})}
	decide(inp).allow
	wrong := prov({"identifier": {"system": "https://fhir-sidecar.dev/clients", "value": "other"}}, [{"type": "MedicationRequest"}])
	inp2 := object.union(inp, {"request": req("POST", "create", "MedicationRequest", null, {"x-provenance": wrong})})
	decide(inp2).reasons == ["X-Provenance agent does not name client refill-bot"]
}

test_provenance_target_on_create_is_the_type if {
	d := decide(lab_create(prov(lab_device, [{"type": "Patient"}]), lab_scopes))
	d.reasons == ["X-Provenance does not target Observation (no id)"]
	d2 := decide(lab_create(prov(lab_device, [{"type": "Observation", "reference": "Observation/other"}]), lab_scopes))
	d2.reasons == ["X-Provenance does not target Observation (no id)"]
}

lab_upd(header_value) := {
	"client": client("legacy-lab-feed", "lab", lab_scopes), "context": ctx,
	"request": req("PUT", "update", "Observation", "9", {"x-provenance": header_value}),
	"resource": tagged(obs_9, "lab"), "current": tagged(obs_9, "lab"),
}

test_provenance_target_on_update_is_type_and_id if {
	decide(lab_upd(prov(lab_device, [{"reference": "Observation/9"}]))).allow
	decide(lab_upd(prov(lab_device, [{"reference": "Observation/9/_history/3"}]))).allow
	d := decide(lab_upd(prov(lab_device, [{"reference": "Observation/10"}])))
	d.reasons == ["X-Provenance does not target Observation/9"]
	d2 := decide(lab_upd(prov(lab_device, [{"type": "Observation"}])))
	d2.reasons == ["X-Provenance does not target Observation/9"]
}

test_provenance_needs_a_create_scope if {
	d := decide(lab_create(prov(lab_device, [{"type": "Observation"}]), ["system/Observation.c", "system/Provenance.rs"]))
	d.reasons == ["client legacy-lab-feed needs a Provenance create scope to send X-Provenance"]
	decide(lab_create(prov(lab_device, [{"type": "Observation"}]), ["system/*.cruds"])).allow
	decide(lab_create(prov(lab_device, [{"type": "Observation"}]), ["patient/Provenance.write"])).allow
	d2 := decide(lab_create(prov(lab_device, [{"type": "Observation"}]), ["system/Provenance.c?x=1"]))
	d2.reasons == ["client legacy-lab-feed needs a Provenance create scope to send X-Provenance"]
}

test_automated_client_needs_a_configured_agent if {
	cfg := {"legacy-lab-feed": {"write_types": ["Observation"], "automated": true}}
	d := decide(lab_create(prov(lab_device, [{"type": "Observation"}]), lab_scopes)) with data.fhir_sidecar.clients as cfg
	d.reasons == ["no provenance agent is configured for automated client legacy-lab-feed"]
}

test_interactive_clients_need_no_provenance if {
	decide(create_by(writer, obs)).allow
}

test_the_sidecars_parse_of_the_header_is_read_when_given if {
	# context.x_provenance is the sidecar's reading of the header: when present, it is what counts
	header := prov(lab_device, [{"type": "Observation"}])
	ok := lab_create(header, lab_scopes)
	decide(ok).allow
	parsed := json.unmarshal(header)
	decide(object.union(ok, {"context": object.union(ctx, {"x_provenance": {"valid": true, "value": parsed}})})).allow
	d := decide(object.union(ok, {"context": object.union(ctx, {"x_provenance": {"valid": false}})}))
	d.reasons == ["X-Provenance is not valid JSON"]
	other := json.unmarshal(prov({"reference": "Device/someone-else"}, [{"type": "Observation"}]))
	d2 := decide(object.union(ok, {"context": object.union(ctx, {"x_provenance": {"valid": true, "value": other}})}))
	d2.reasons == ["X-Provenance agent does not name client legacy-lab-feed"]
}
