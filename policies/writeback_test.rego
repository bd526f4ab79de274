# Tests for the starter write-back policy: each rule both ways. `opa test policies/` or
# `fhir-sidecar policy test policies/`. They call decision_for(input) rather than using
# `with input as`, which the embedded engine cannot run here (see README.md), and replace
# settings with `with data.fhir_sidecar.<key> as ...`.
package fhir.writeback_test

import rego.v1

tenant_system := "https://fhir-sidecar.dev/CodeSystem/tenant"

weekday_noon := "2026-11-25T13:00:00Z" # a Wednesday

decide(inp) := data.fhir.writeback.decision_for(inp)

# ---- input builders ------------------------------------------------------------------

client(id, tenant, scopes) := {"id": id, "tenant": tenant, "scopes": scopes, "patient": null, "user": null, "auth": "api-key"}

req(method, interaction, rtype, id, headers) := {
	"method": method, "path": path_of(rtype), "interaction": interaction, "resource_type": rtype,
	"id": id, "operation": null, "conditional": endswith(interaction, "-conditional"), "query": {},
	"headers": headers, "write": true,
}

path_of(rtype) := concat("/", ["", rtype]) if is_string(rtype)
else := "/"

ctx := {"time": weekday_noon, "shadow": false, "approvals": []}

tagged(res, tenant) := object.union(res, {"meta": {"tag": [{"system": tenant_system, "code": tenant}]}})

create_by(cl, res) := {"client": cl, "request": req("POST", "create", res.resourceType, null, {}), "resource": res, "context": ctx}

update_by(cl, res, cur) := {
	"client": cl, "request": req("PUT", "update", res.resourceType, res.id, {}),
	"resource": res, "current": cur, "context": ctx,
}

delete_by(cl, rtype, id, cur) := {"client": cl, "request": req("DELETE", "delete", rtype, id, {}), "current": cur, "context": ctx}

obs := {"resourceType": "Observation", "status": "final", "code": {"text": "hr"}}

obs_9 := {"resourceType": "Observation", "id": "9", "status": "final", "code": {"text": "hr"}}

writer := client("demo-writer", "t1", ["system/Observation.cruds"])

scribe := client("scribe-app", "t1", ["system/Observation.cruds", "system/DocumentReference.cru"])

# ---- who may write what -------------------------------------------------------------------

test_demo_writer_may_create_an_observation if {
	d := decide(create_by(writer, obs))
	d.allow
	d.reasons == []
	d.review == false
}

test_demo_writer_may_not_write_a_medication_request if {
	d := decide(create_by(writer, {"resourceType": "MedicationRequest"}))
	not d.allow
	d.reasons == ["MedicationRequest writes are not allowed for client demo-writer"]
}

test_demo_reader_writes_nothing if {
	d := decide(create_by(client("demo-reader", "t1", []), obs))
	d.reasons == ["Observation writes are not allowed for client demo-reader"]
}

test_unknown_client_is_denied if {
	d := decide(create_by(client("stranger", "t1", []), obs))
	not d.allow
	"client has no policy entry" in d.reasons
}

test_no_data_denies if {
	d := decide(create_by(writer, obs)) with data.fhir_sidecar as {}
	not d.allow
	"client has no policy entry" in d.reasons
}

test_write_operation_needs_the_policy_listing if {
	inp := {
		"client": scribe, "context": ctx, "resource": {"resourceType": "Parameters"},
		"request": object.union(req("POST", "operation", "Observation", "1", {}), {"operation": "$meta-add"}),
	}
	d := decide(inp)
	not d.allow
	"operation $meta-add is not allowed by policy for client scribe-app" in d.reasons
	d2 := decide(inp) with data.fhir_sidecar.clients as {"scribe-app": {"write_types": ["Observation"], "operations": ["$meta-add"]}}
	d2.allow
}

test_conditional_writes_need_data_permission if {
	inp := {
		"client": writer, "context": ctx, "resource": obs,
		"request": object.union(req("PUT", "update-conditional", "Observation", null, {}), {"query": {"identifier": ["x"]}}),
	}
	d := decide(inp)
	d.reasons == ["update-conditional is not allowed for client demo-writer"]
	d2 := decide(inp) with data.fhir_sidecar.clients as {"demo-writer": {"write_types": ["Observation"], "conditional_writes": true}}
	d2.allow
}

bundle_by(cl, entries) := {
	"client": cl, "context": ctx, "resource": {"resourceType": "Bundle", "type": "transaction"},
	"request": req("POST", "transaction", null, null, {}),
	"entries": entries,
}

entry(method, interaction, res, id) := {"request": req(method, interaction, res.resourceType, id, {}), "resource": res}

test_transaction_entries_are_checked_one_by_one if {
	ok := decide(bundle_by(writer, [entry("POST", "create", obs, null), entry("PUT", "update", obs_9, "9")]))
	ok.allow
	bad := decide(bundle_by(writer, [entry("POST", "create", obs, null), entry("POST", "create", {"resourceType": "Basic"}, null)]))
	bad.reasons == ["Basic writes are not allowed for client demo-writer"]
}

test_a_write_without_readable_writes_is_denied if {
	d := decide(bundle_by(writer, []))
	d.reasons == ["the writes of this request could not be read"]
	reads := [{"request": object.union(req("GET", "read", "Observation", "1", {}), {"write": false})}]
	d2 := decide(object.union(bundle_by(writer, reads), {"request": object.union(req("POST", "batch", null, null, {}), {"write": false})}))
	d2.allow
}

# ---- what content rules need --------------------------------------------------------------

test_patch_result_must_be_given_for_content_rules if {
	patch := {
		"client": scribe, "context": ctx, "request": req("PATCH", "patch", "Observation", "9", {}),
		"resource": {"resourceType": "Parameters"}, "current": tagged(obs_9, "t1"),
	}
	d := decide(patch)
	d.reasons == ["the resulting Observation is not available to policy"]
	d2 := decide(object.union(patch, {"resource": tagged(obs_9, "t1")}))
	d2.allow
}

test_stored_version_must_be_given_for_content_rules if {
	d := decide({"client": scribe, "context": ctx, "request": req("PUT", "update", "Observation", "9", {}), "resource": tagged(obs_9, "t1")})
	d.reasons == ["the stored version of Observation/9 was not provided to policy"]
	decide(update_by(scribe, tagged(obs_9, "t1"), tagged(obs_9, "t1"))).allow
}

test_clients_without_content_rules_need_no_stored_version if {
	decide({"client": writer, "context": ctx, "request": req("DELETE", "delete", "Observation", "9", {})}).allow
}

# ---- the short paths -------------------------------------------------------------------------

full_rules(inp) := data.fhir.writeback.full_decision(inp)

# The short paths of decision_for (plain writes, and bundles of them) decide as every rule does.
# (tests/test_policy_shape.py checks that plain writes do take the short paths.)
test_short_path_is_the_full_path if {
	short := [
		create_by(writer, obs), update_by(writer, obs_9, null), delete_by(writer, "Observation", "9", null),
		bundle_by(writer, [entry("POST", "create", obs, null), entry("PUT", "update", obs_9, "9")]),
	]
	every inp in short {
		decide(inp).allow
		decide(inp) == full_rules(inp)
	}
	not_short := [
		create_by(scribe, tagged(obs, "t1")),
		create_by(writer, {"resourceType": "Basic"}),
		object.union(create_by(writer, obs), {"entries": []}),
		object.union(create_by(writer, obs), {"request": object.union(req("POST", "create", "Observation", null, {}), {"conditional": true})}),
		bundle_by(writer, [entry("POST", "create", obs, null), entry("POST", "create", {"resourceType": "Basic"}, null)]),
		bundle_by(scribe, [entry("POST", "create", tagged(obs, "t1"), null)]),
	]
	every inp in not_short {
		decide(inp) == full_rules(inp)
	}
}
