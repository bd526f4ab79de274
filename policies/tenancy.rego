# Tenant boundary (data: tenancy.tag_system; clients.<id>.tenant_boundary: true).
# For a bound client, the stored version (`current`) of what it updates, patches or deletes and
# the resulting resource of what it creates, updates or patches must both carry a `meta.tag` of
# the tenant system with the client's tenant, and no other tenant. A tag the client sets on the
# result alone proves nothing: the check on the stored version is what keeps tenants apart.
package fhir.writeback

import rego.v1

default tag_system := null

tag_system := tenancy.tag_system

# bound: the client is tenant-bound; n: how many writes the request holds.
tenancy_request_checks(bound, client, n) := no_tenant | no_system if {
	bound == true
	n > 0
	no_tenant := {{"rule": "no_tenant"} | not valid_tenant(object.get(client, "tenant", null))}
	no_system := {{"rule": "no_tag_system"} | not valid_tenant(tag_system)}
} else := set()

valid_tenant(t) if {
	is_string(t)
	t != ""
}

# The codes of the tenant tags among these tags (a resource's meta.tag).
tenant_codes(tags) := {object.get(tag, "code", null) | some tag in tags; tag.system == tag_system}

# result: [the tenant codes of the resulting resource] (empty when the write produces none);
# stored: [those of the stored version] (empty when it touches none). (per_write_denies:
# writeback.rego.) No tenant tag: untagged; a tenant tag of another tenant: another tenant's.
tenancy_checks(tenant, result, stored) := ((result_untagged | result_other) | stored_untagged) | stored_other if {
	result_untagged := {{"rule": "result_untagged"} | some codes in result; codes == set()}
	result_other := {{"rule": "result_other"} | some codes in result; codes - {tenant} != set()}
	stored_untagged := {{"rule": "stored_untagged"} | some codes in stored; codes == set()}
	stored_other := {{"rule": "stored_other"} | some codes in stored; codes - {tenant} != set()}
}

reason(r, _, cid, _) := concat("", ["client ", who(cid), " has no tenant (tenant boundary)"]) if r.rule == "no_tenant"

reason(r, _, _, _) := "tenancy.tag_system is not configured (tenant boundary)" if r.rule == "no_tag_system"

reason(r, w, _, tenant) := concat("", [label(w), "the resulting ", shown(w.type), " is not tagged with tenant ", shown(tenant)]) if r.rule == "result_untagged"

reason(r, w, _, tenant) := concat("", [label(w), "the resulting ", shown(w.type), " is tagged with a tenant other than ", shown(tenant)]) if r.rule == "result_other"

reason(r, w, _, tenant) := concat("", [label(w), "the stored ", target(w), " is not tagged with tenant ", shown(tenant)]) if r.rule == "stored_untagged"

reason(r, w, _, _) := concat("", [label(w), "the stored ", target(w), " belongs to another tenant"]) if r.rule == "stored_other"
