# fhir-sidecar starter write-back policy: the decision and the facts every rule shares.
#
# Settings live in data.json under `fhir_sidecar` (see README.md in this folder), never in Rego.
# Reasons come in two kinds: denies (the write is refused) and holds (it waits for a human
# review while `context.approvals` is empty). A missing setting means the strict choice.
#
# The decision is the function `decision_for(input)`: tests call it with their input instead of
# `with input as`, which the embedded engine (regopy 1.5) cannot run over rules that depend on
# other input-dependent rules. Settings stay rules over data, so tests replace them with
# `with data.fhir_sidecar.<key> as ...`. README.md lists what else keeps both engines equal.
# Valid Rego v1 for a stock OPA (>= 1.0) and for the embedded engine.
package fhir.writeback

import rego.v1

default decision := {"allow": false, "reasons": ["policy produced no decision"], "review": false}

decision := decision_for(input)

# The reasons for the current input (for reading, `policy eval` and debugging).
deny := denies(input, clients[input.client.id])

hold := holds(input, clients[input.client.id])

# The client's entry is looked up once and passed along (lookups are slow on the embedded engine).
# A plain write by a client without content, tenancy, provenance or review settings for it is
# allowed on a short path: every rule below would find nothing (test_short_path_is_the_full_path).
decision_for(inp) := {"allow": true, "reasons": [], "review": false} if {
	c := clients[inp.client.id]
	plain_write(inp, c)
} else := verdict(denies(inp, c), holds(inp, c)) if {
	c := clients[inp.client.id]
	is_object(c)
} else := verdict({"client has no policy entry"}, set())

plain_write(inp, c) if {
	not inp.entries
	r := inp.request
	r.write == true
	t := r.resource_type
	t in object.get(c, "write_types", [])
	r.operation == null
	r.conditional == false
	not c.fields[t]
	not c.status[t]
	not c.tenant_boundary
	not c.automated
	not t in object.get(review_settings, ["high_impact", "types"], [])
	not t in object.get(review_settings, ["after_hours", "types"], [])
}

# review: true means "hold this write for a reviewer": allow stays false until one approved.
verdict(d, h) := {"allow": true, "reasons": [], "review": false} if {
	count(d) == 0
	count(h) == 0
}

verdict(d, _) := {"allow": false, "reasons": sort([r | some r in d]), "review": false} if count(d) > 0

verdict(d, h) := {"allow": false, "reasons": sort([r | some r in h]), "review": true} if {
	count(d) == 0
	count(h) > 0
}

denies(inp, c) := request_denies(inp, c) | write_denies(inp, c)

# Reasons about the request as a whole.
request_denies(inp, c) := (unreadable | tenancy_request_denies(inp, c)) | provenance_request_denies(inp, c) if {
	# a writing request yields at least one write: anything else is a misread input
	unreadable := {msg |
		inp.request.write == true
		write_count(inp) == 0
		msg := "the writes of this request could not be read"
	}
}

# Reasons about each write: the request itself, or each writing entry of a batch/transaction.
# (Each write is passed to the rule functions as it is: a function that *returns* part of the
# input is slow on the embedded engine, one that receives it is not.)
write_denies(inp, c) := {r |
	some i
	e := inp.entries[i]
	e.request.write == true
	some r in per_write_denies(inp, sprintf("entry %d: ", [i]), e, c)
} if {
	is_bundle(inp)
} else := per_write_denies(inp, "", inp, c) if {
	inp.request.write == true
} else := set()

# Each family is only entered when the client has rules for it (every step costs on the
# embedded engine, so the common case stays short).
per_write_denies(inp, label, w, c) := (((core_write_denies(inp, label, w, c) | field_denies(inp, label, w, c)) | status_denies(inp, label, w, c)) | tenancy_write_denies(inp, label, w, c)) | provenance_write_denies(inp, label, w, c)

holds(inp, c) := set() if {
	count(object.get(inp.context, "approvals", [])) > 0
} else := {r |
	some e in inp.entries
	e.request.write == true
	some r in per_write_holds(inp, e, c)
} if {
	is_bundle(inp)
} else := per_write_holds(inp, inp, c) if {
	inp.request.write == true
} else := set()

# ---- settings (data.fhir_sidecar) ------------------------------------------------------

default clients := {}

clients := data.fhir_sidecar.clients

default tenancy := {}

tenancy := data.fhir_sidecar.tenancy

default review_settings := {}

review_settings := data.fhir_sidecar.review

# ---- facts -----------------------------------------------------------------------------

automated(c) if c.automated == true

tenant_bound(c) if c.tenant_boundary == true

is_bundle(inp) if is_array(inp.entries)

write_count(inp) := count([1 | some e in inp.entries; e.request.write == true]) if is_bundle(inp)
else := 1 if inp.request.write == true
else := 0

# Interactions that produce a resource (`resource` is the result) and that touch a stored one
# (`current` is the stored version: an object, or null when there is none).
produces := {"create", "create-conditional", "update", "update-conditional", "patch", "patch-conditional"}

touches := {"update", "update-conditional", "patch", "patch-conditional", "delete", "delete-conditional"}

# The write carries its resulting resource.
has_result(w) if {
	is_object(w.resource)
	w.resource.resourceType == w.request.resource_type
}

# `current` was provided: the stored version, or null for "there is none".
has_current(w) if w.current == null

has_current(w) if is_object(w.current)

# How a write names its target in reasons: Type/id, or the type for a create / conditional write.
target(w) := concat("/", [shown(w.request.resource_type), shown(w.request.id)]) if is_string(w.request.id)
else := concat("", [shown(object.get(w.request, "resource_type", null)), " (no id)"])

# The client as reasons name it.
who(inp) := shown(inp.client.id) if is_string(inp.client.id)
else := "(no client id)"

# A value as reasons show it. Reasons are logged and audited: only plain tokens are echoed.
# (Messages are built with concat, not sprintf: the embedded engine's sprintf quotes strings
# that other builtins produced. Every part of a message must be defined, or the reason would
# silently vanish: hence shown() for anything read from the input.)
shown(v) := v if {
	is_string(v)
	regex.match(`^[A-Za-z0-9_$][A-Za-z0-9_.:/$-]{0,63}$`, v)
}
else := "absent" if v == null
else := "(unprintable value)"

# ---- who may write what ----------------------------------------------------------------

core_write_denies(inp, label, w, c) := (((types | operations) | conditionals) | no_result) | no_current if {
	types := {msg |
		t := w.request.resource_type
		is_string(t)
		not t in object.get(c, "write_types", [])
		msg := concat("", [shown(t), " writes are not allowed for client ", who(inp)])
	}

	operations := {msg |
		op := w.request.operation
		is_string(op)
		not op in object.get(c, "operations", [])
		msg := concat("", ["operation ", shown(op), " is not allowed by policy for client ", who(inp)])
	}

	conditionals := {msg |
		w.request.conditional == true
		object.get(c, "conditional_writes", false) != true
		msg := concat("", [label, shown(object.get(w.request, "interaction", null)), " is not allowed for client ", who(inp)])
	}

	# what the content rules need: the resulting resource, and the stored version
	no_result := {msg |
		w.request.interaction in produces
		content_rules(c, w.request.resource_type)
		not has_result(w)
		msg := concat("", [label, "the resulting ", shown(w.request.resource_type), " is not available to policy"])
	}

	no_current := {msg |
		w.request.interaction in touches
		needs_current(c, w.request.resource_type)
		not has_current(w)
		msg := concat("", [label, "the stored version of ", target(w), " was not provided to policy"])
	}
}

content_rules(c, t) if c.fields[t]

content_rules(c, t) if c.status[t]

content_rules(c, _) if tenant_bound(c)

needs_current(c, t) if c.status[t]

needs_current(c, _) if tenant_bound(c)
