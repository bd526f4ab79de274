# Tenant boundary (data: tenancy.tag_system; clients.<id>.tenant_boundary: true).
# For a bound client, the stored version (`current`) of what it updates, patches or deletes and
# the resulting resource of what it creates, updates or patches must both carry a `meta.tag` of
# the tenant system with the client's tenant, and no other tenant. A tag the client sets on the
# result alone proves nothing: the check on the stored version is what keeps tenants apart.
package fhir.writeback

import rego.v1

default tag_system := null

tag_system := tenancy.tag_system

tenancy_request_denies(inp, c) := tenancy_setup(inp) if {
	tenant_bound(c)
} else := set()

tenancy_setup(inp) := no_tenant | no_system if {
	write_count(inp) > 0
	no_tenant := {msg |
		not valid_tenant(object.get(inp.client, "tenant", null))
		msg := concat("", ["client ", who(inp), " has no tenant (tenant boundary)"])
	}
	no_system := {msg | not valid_tenant(tag_system); msg := "tenancy.tag_system is not configured (tenant boundary)" }
} else := set()

valid_tenant(t) if {
	is_string(t)
	t != ""
}

tenancy_write_denies(inp, label, w, c) := tenancy_checks(label, w, object.get(inp.client, "tenant", null)) if {
	tenant_bound(c)
} else := set()

tenancy_checks(label, w, tenant) := ((result_untagged | result_other) | stored_untagged) | stored_other if {
	result_untagged := {msg |
		w.request.interaction in produces
		has_result(w)
		not tagged_any(w.resource)
		msg := concat("", [label, "the resulting ", shown(w.request.resource_type), " is not tagged with tenant ", shown(tenant)])
	}
	result_other := {msg |
		w.request.interaction in produces
		has_result(w)
		tagged_other(w.resource, tenant)
		msg := concat("", [label, "the resulting ", shown(w.request.resource_type), " is tagged with a tenant other than ", shown(tenant)])
	}
	stored_untagged := {msg |
		w.request.interaction in touches
		is_object(w.current)
		not tagged_any(w.current)
		msg := concat("", [label, "the stored ", target(w), " is not tagged with tenant ", shown(tenant)])
	}
	stored_other := {msg |
		w.request.interaction in touches
		is_object(w.current)
		tagged_other(w.current, tenant)
		msg := concat("", [label, "the stored ", target(w), " belongs to another tenant"])
	}
} else := set()

# r carries a tenant tag / a tenant tag whose code is not `tenant`.
tagged_any(r) if {
	some tag in r.meta.tag
	tag.system == tag_system
}

tagged_other(r, tenant) if {
	some tag in r.meta.tag
	tag.system == tag_system
	object.get(tag, "code", null) != tenant
}
