# OPA's own API authorization (opa run --authorization=basic): every request to OPA's HTTP API is
# decided here. fhir-sidecar only ever asks for its decision, so that is the one API call allowed
# (plus GET /health). Writing policies or data (PUT /v1/policies, PUT/PATCH /v1/data, ...),
# reading them back, ad-hoc queries, config and status are refused to everyone. Policies are
# loaded from files at start, never through the API.
package system.authz

import rego.v1

default allow := false

decision_prefix := __DECISION_PREFIX__

allow if {
	input.method == "POST"
	count(input.path) >= count(decision_prefix)
	array.slice(input.path, 0, count(decision_prefix)) == decision_prefix
}

allow if {
	input.method == "GET"
	input.path == ["health"]
}
