# Tests for fields.rego, status.rego and tenancy.rego (helpers in writeback_test.rego).
package fhir.writeback_test

import rego.v1

# ---- fields ---------------------------------------------------------------------------

test_denied_field_is_named_not_stripped if {
	res := tagged(object.union(obs, {"extension": [{"url": "https://x.example/e", "valueString": "v"}]}), "t1")
	d := decide(create_by(scribe, res))
	d.reasons == ["Observation.extension is not allowed for client scribe-app"]
	decide(create_by(scribe, tagged(obs, "t1"))).allow
}

test_denied_nested_field if {
	res := {"resourceType": "Observation", "status": "final", "meta": {
		"security": [{"code": "R"}],
		"tag": [{"system": tenant_system, "code": "t1"}],
	}}
	d := decide(create_by(scribe, res))
	d.reasons == ["Observation.meta.security is not allowed for client scribe-app"]
}

test_denied_field_inside_arrays if {
	res := tagged({"resourceType": "MedicationRequest", "substitution": {"extension": [{"url": "u"}]}}, "t1")
	d := decide(create_by(client("ward-app", "t1", []), res))
	d.reasons == ["MedicationRequest.substitution.extension is not allowed for client ward-app"]
}

docref(status) := tagged({"resourceType": "DocumentReference", "status": "current", "docStatus": status, "content": []}, "t1")

test_field_allow_list if {
	res := object.union(docref("preliminary"), {"extension": [{"url": "u"}], "securityLabel": []})
	d := decide(create_by(scribe, res))
	d.reasons == [
		"DocumentReference.extension is not allowed for client scribe-app",
		"DocumentReference.securityLabel is not allowed for client scribe-app",
	]
	decide(create_by(scribe, docref("preliminary"))).allow
}

# ---- status ---------------------------------------------------------------------------

test_drafting_client_writes_only_preliminary if {
	d := decide(create_by(scribe, docref("final")))
	d.reasons == ["DocumentReference.docStatus final is not allowed for client scribe-app (allowed: preliminary)"]
	d2 := decide(create_by(scribe, {"resourceType": "DocumentReference", "status": "current", "meta": {"tag": [{"system": tenant_system, "code": "t1"}]}}))
	d2.reasons == ["DocumentReference.docStatus absent is not allowed for client scribe-app (allowed: preliminary)"]
	decide(create_by(scribe, docref("preliminary"))).allow
}

test_drafting_client_may_not_change_a_final_document if {
	d := decide(update_by(scribe, object.union(docref("preliminary"), {"id": "d1"}), object.union(docref("final"), {"id": "d1"})))
	d.reasons == ["DocumentReference/d1 is docStatus final and may not be changed by client scribe-app"]
	decide(update_by(scribe, object.union(docref("preliminary"), {"id": "d1"}), object.union(docref("preliminary"), {"id": "d1"}))).allow
}

test_drafting_client_may_not_delete_a_final_document if {
	d := decide(delete_by(scribe, "DocumentReference", "d1", object.union(docref("final"), {"id": "d1"})))
	d.reasons == ["DocumentReference/d1 is docStatus final and may not be changed by client scribe-app"]
	decide(delete_by(scribe, "DocumentReference", "d1", object.union(docref("preliminary"), {"id": "d1"}))).allow
}

lab := client("legacy-lab-feed", "lab", ["system/Observation.c", "system/Provenance.c"])

lab_update(from, to) := object.union(
	update_by(lab, tagged(object.union(obs_9, {"status": to}), "lab"), tagged(object.union(obs_9, {"status": from}), "lab")),
	{"request": req("PUT", "update", "Observation", "9", {"x-provenance": json.marshal({
		"resourceType": "Provenance",
		"target": [{"reference": "Observation/9"}],
		"agent": [{"who": {"reference": "Device/legacy-lab-feed"}}],
	})})},
)

test_status_transitions if {
	decide(lab_update("preliminary", "final")).allow
	decide(lab_update("final", "amended")).allow
	decide(lab_update("final", "final")).allow
	d := decide(lab_update("final", "preliminary"))
	d.reasons == ["Observation/9.status may not go from final to preliminary for client legacy-lab-feed"]
	d2 := decide(lab_update("entered-in-error", "final"))
	d2.reasons == [
		"Observation/9 is status entered-in-error and may not be changed by client legacy-lab-feed",
		"Observation/9.status may not go from entered-in-error to final for client legacy-lab-feed",
	]
}

# ---- tenancy --------------------------------------------------------------------------

test_result_must_carry_the_client_tenant if {
	decide(create_by(scribe, tagged(obs, "t1"))).allow
	d := decide(create_by(scribe, obs))
	d.reasons == ["the resulting Observation is not tagged with tenant t1"]
	d2 := decide(create_by(scribe, tagged(obs, "t2")))
	d2.reasons == ["the resulting Observation is tagged with a tenant other than t1"]
	both := object.union(obs, {"meta": {"tag": [{"system": tenant_system, "code": "t1"}, {"system": tenant_system, "code": "t2"}]}})
	d3 := decide(create_by(scribe, both))
	d3.reasons == ["the resulting Observation is tagged with a tenant other than t1"]
}

test_other_tenants_tags_do_not_count if {
	res := object.union(obs, {"meta": {"tag": [{"system": "https://other.example/tenant", "code": "t1"}]}})
	d := decide(create_by(scribe, res))
	d.reasons == ["the resulting Observation is not tagged with tenant t1"]
}

test_stored_version_decides_the_tenant if {
	# the client tags the result with its own tenant: the stored version still belongs to t2
	d := decide(update_by(scribe, tagged(obs_9, "t1"), tagged(obs_9, "t2")))
	d.reasons == ["the stored Observation/9 belongs to another tenant"]
	d2 := decide(update_by(scribe, tagged(obs_9, "t1"), obs_9))
	d2.reasons == ["the stored Observation/9 is not tagged with tenant t1"]
	decide(update_by(scribe, tagged(obs_9, "t1"), tagged(obs_9, "t1"))).allow
}

test_delete_checks_the_stored_tenant if {
	d := decide(delete_by(scribe, "Observation", "9", tagged(obs_9, "t2")))
	d.reasons == ["the stored Observation/9 belongs to another tenant"]
	decide(delete_by(scribe, "Observation", "9", tagged(obs_9, "t1"))).allow
}

test_update_that_creates_has_no_stored_version if {
	decide(update_by(scribe, tagged(obs_9, "t1"), null)).allow
	d := decide(update_by(scribe, tagged(obs_9, "t2"), null))
	d.reasons == ["the resulting Observation is tagged with a tenant other than t1"]
}

test_bound_client_needs_a_tenant if {
	d := decide(create_by(client("scribe-app", null, []), tagged(obs, "t1")))
	"client scribe-app has no tenant (tenant boundary)" in d.reasons
}

test_tenant_system_must_be_configured if {
	d := decide(create_by(scribe, tagged(obs, "t1"))) with data.fhir_sidecar.tenancy as {}
	d.reasons == [
		"tenancy.tag_system is not configured (tenant boundary)",
		"the resulting Observation is not tagged with tenant t1",
	]
}
