# Tests for review.rego: writes held for review while no reviewer has approved.
package fhir.writeback_review_test

import rego.v1

tenant_system := "https://fhir-sidecar.dev/CodeSystem/tenant"

mr := {"resourceType": "MedicationRequest", "status": "active", "meta": {"tag": [{"system": tenant_system, "code": "t1"}]}}

bot_provenance := json.marshal({
	"resourceType": "Provenance", "target": [{"type": "MedicationRequest"}],
	"agent": [{"who": {"reference": "Device/refill-bot"}}],
})

write(client_id, time, approvals, headers) := {
	"client": {"id": client_id, "tenant": "t1", "scopes": ["system/MedicationRequest.c", "system/Provenance.c"],
		"patient": null, "user": null, "auth": "api-key"},
	"request": {"method": "POST", "path": "/MedicationRequest", "interaction": "create",
		"resource_type": "MedicationRequest", "id": null, "operation": null, "conditional": false,
		"query": {}, "headers": headers, "write": true},
	"resource": mr,
	"context": {"time": time, "shadow": false, "approvals": approvals},
}

decide(inp) := data.fhir.writeback.decision_for(inp)

office_hours(offset, days) := {
	"types": ["MedicationRequest"], "start": "07:00", "end": "19:00", "utc_offset_minutes": offset, "days": days,
}


test_high_impact_write_by_automated_client_is_held if {
	d := decide(write("refill-bot", "2026-11-25T13:00:00Z", [], {"x-provenance": bot_provenance}))
	d == {"allow": false, "review": true, "reasons": ["MedicationRequest is a high-impact write and needs review"]}
}

test_high_impact_write_is_allowed_once_approved if {
	d := decide(write("refill-bot", "2026-11-25T13:00:00Z", ["Practitioner/7"], {"x-provenance": bot_provenance}))
	d == {"allow": true, "review": false, "reasons": []}
}

test_denies_win_over_review if {
	d := decide(write("refill-bot", "2026-11-25T13:00:00Z", [], {}))
	d.allow == false
	d.review == false
	d.reasons == ["X-Provenance header is required for automated client refill-bot"]
}

test_interactive_client_is_not_high_impact if {
	decide(write("ward-app", "2026-11-25T13:00:00Z", [], {})).allow
	d := decide(write("ward-app", "2026-11-25T13:00:00Z", [], {})) with data.fhir_sidecar.review as {
		"high_impact": {"types": ["MedicationRequest"], "automated_only": false},
	}
	d.reasons == ["MedicationRequest is a high-impact write and needs review"]
	d.review
}

test_after_hours_write_is_held if {
	d := decide(write("ward-app", "2026-11-25T22:30:00Z", [], {}))
	d == {"allow": false, "review": true, "reasons": ["MedicationRequest writes outside business hours need review"]}
	decide(write("ward-app", "2026-11-25T22:30:00Z", ["Practitioner/7"], {})).allow
}

test_business_hours_edges if {
	decide(write("ward-app", "2026-11-25T07:00:00Z", [], {})).allow
	decide(write("ward-app", "2026-11-25T18:59:59Z", [], {})).allow
	decide(write("ward-app", "2026-11-25T19:00:00Z", [], {})).review
	decide(write("ward-app", "2026-11-25T06:59:00Z", [], {})).review
}

test_weekend_write_is_held if {
	decide(write("ward-app", "2026-11-28T13:00:00Z", [], {})).review # a Saturday
	decide(write("ward-app", "2026-11-29T13:00:00Z", [], {})).review # a Sunday
	decide(write("ward-app", "2026-11-30T13:00:00Z", [], {})).allow # a Monday
	decide(write("ward-app", "2024-02-29T13:00:00.250Z", [], {})).allow # a leap-day Thursday
}

test_business_hours_in_local_time if {
	# 06:30 UTC is 07:30 at UTC+1, and 23:30 UTC on Friday is 00:30 on Saturday there
	decide(write("ward-app", "2026-11-25T06:30:00Z", [], {})).review
	plus_one := office_hours(60, ["Mon", "Tue", "Wed", "Thu", "Fri"])
	decide(write("ward-app", "2026-11-25T06:30:00Z", [], {})).allow with data.fhir_sidecar.review.after_hours as plus_one
	decide(write("ward-app", "2026-11-27T23:30:00Z", [], {})).review with data.fhir_sidecar.review.after_hours as plus_one
	fridays_west := {
		"types": ["MedicationRequest"], "start": "00:00", "end": "23:59", "utc_offset_minutes": -60,
		"days": ["Fri"],
	}
	decide(write("ward-app", "2026-11-27T23:30:00Z", [], {})).allow with data.fhir_sidecar.review.after_hours as fridays_west
}

test_unreadable_time_counts_as_after_hours if {
	decide(write("ward-app", "2026-11-25T13:00:00+01:00", [], {})).review
	decide(write("ward-app", "yesterday", [], {})).review
}

test_other_types_are_not_held_after_hours if {
	d := decide({
		"client": {"id": "ward-app", "tenant": "t1", "scopes": [], "patient": null, "user": null, "auth": "api-key"},
		"request": {"method": "POST", "path": "/Observation", "interaction": "create", "resource_type": "Observation",
			"id": null, "operation": null, "conditional": false, "query": {}, "headers": {}, "write": true},
		"resource": {"resourceType": "Observation", "status": "final", "meta": mr.meta},
		"context": {"time": "2026-11-28T23:00:00Z", "shadow": false, "approvals": []},
	})
	d.allow
}

test_the_sidecars_clock_is_read_when_given if {
	# context.clock is the sidecar's reading of context.time: when present, it is what counts
	noon := write("ward-app", "2026-11-25T13:00:00Z", [], {}) # a Wednesday
	decide(noon).allow
	sunday := {"time": "2026-11-25T13:00:00Z", "clock": {"weekday": 0, "minute": 780}, "shadow": false, "approvals": []}
	d := decide(object.union(noon, {"context": sunday}))
	d.review
	d.reasons == ["MedicationRequest writes outside business hours need review"]
	wednesday := {"time": "2026-11-25T13:00:00Z", "clock": {"weekday": 3, "minute": 780}, "shadow": false, "approvals": []}
	decide(object.union(noon, {"context": wednesday})).allow
	late := {"time": "2026-11-25T13:00:00Z", "clock": {"weekday": 3, "minute": 1170}, "shadow": false, "approvals": []}
	decide(object.union(noon, {"context": late})).review
}
