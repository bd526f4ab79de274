# The write-back policy: the decision for one write request (DESIGN.md, "Rego policy contract").
# Settings live in data.json (data.fhir_sidecar, documented in this folder), never in Rego.
# Reasons come in two kinds: denies (the write is refused) and holds (it waits for a human
# review while `context.approvals` is empty). A missing setting means the strict choice.
#
# The sidecar asks for `decision`. The tests call `decision_for(inp)` (decision_for_test.rego),
# the same rules word for word over an argument: `with input as` does not run on the embedded
# engine (regopy 1.5), and `decision` cannot simply be `decision_for(input)`, since that engine
# copies every value handed to a function (tests/test_policy_shape.py holds the two texts
# equal). README.md lists what keeps this engine and OPA equal, and what keeps this engine fast.
# Valid Rego v1 for a stock OPA (>= 1.0) and for the embedded engine.
package fhir.writeback

import rego.v1

default decision := {"allow": false, "reasons": ["policy produced no decision"], "review": false}

# >>> decision
decision := allowed if {
	# A plain write: a type the client may write, and no content, tenancy, provenance or review
	# setting applies to it, so every rule would find nothing (test_short_path_is_the_full_path).
	c := clients[input.client.id]
	not c.tenant_boundary
	not c.automated
	count([1 | is_array(input.entries)]) == 0 # not a batch/transaction
	r := input.request
	r.write == true
	r.operation == null
	r.conditional == false
	t := r.resource_type
	t in c.write_types
	not c.fields[t]
	not c.status[t]
	not t in object.get(review_settings, ["high_impact", "types"], [])
	not t in object.get(review_settings, ["after_hours", "types"], [])
} else := allowed if {
	# A batch/transaction of plain writes (the reads in it need nothing).
	c := clients[input.client.id]
	not c.tenant_boundary
	not c.automated
	input.request.write == true
	is_array(input.entries)
	plain := plain_types(c)
	n := count([1 | some e in input.entries; e.request.write == true])
	n > 0
	count([1 |
		some e in input.entries
		r := e.request
		r.write == true
		r.operation == null
		r.conditional == false
		r.resource_type in plain
	]) == n
} else := verdict(d, h) if {
	# Every rule. The writes are the request itself, or each writing entry of a batch/transaction.
	cid := input.client.id
	c := clients[cid]
	is_object(c)
	r := input.request
	bundle := count([1 | is_array(input.entries)]) == 1
	single := [true | bundle == false; r.write == true]
	each := [i | bundle == true; some i; e := input.entries[i]; e.request.write == true]
	tenant := object.get(input.client, "tenant", null)
	prov := provenance_header(object.get(c, "automated", null) == true, object.get(r, "headers", {}), object.get(input, "context", {}))
	d := (request_denies(object.get(c, "tenant_boundary", null) == true, object.get(c, "automated", null) == true, object.get(c, "provenance_agent", null), cid, input.client, object.get(r, "write", null), count(single) + count(each), prov) | {m |
		some _ in single
		some m in per_write_denies(null, r, object.get(input, "resource", false), object.get(input, "current", false), c, cid, tenant, prov)
	}) | {m |
		some i in each
		e := input.entries[i]
		some m in per_write_denies(i, e.request, object.get(e, "resource", false), object.get(e, "current", false), c, cid, tenant, prov)
	}
	types := {t | some _ in single; t := r.resource_type} | {t | some i in each; t := input.entries[i].request.resource_type}
	held := {t | some t in types; t in review_settings.high_impact.types} | {t | some t in types; t in review_settings.after_hours.types}
	h := holds(held != set(), c, held, object.get(input, "context", {}))
} else := verdict({"client has no policy entry"}, set())
# <<< decision

allowed := {"allow": true, "reasons": [], "review": false}

# review: true means "hold this write for a reviewer": allow stays false until one approved.
verdict(d, h) := allowed if {
	count(d) == 0
	count(h) == 0
}

verdict(d, _) := {"allow": false, "reasons": sort([r | some r in d]), "review": false} if count(d) > 0

verdict(d, h) := {"allow": false, "reasons": sort([r | some r in h]), "review": true} if {
	count(d) == 0
	count(h) > 0
}

# The types a client writes on the short path: no content, status or review rules for them.
plain_types(c) := {t |
	some t in c.write_types
	not c.fields[t]
	not c.status[t]
	not t in object.get(review_settings, ["high_impact", "types"], [])
	not t in object.get(review_settings, ["after_hours", "types"], [])
}

# ---- how rules are written -------------------------------------------------------------
# Each family of rules first finds what is wrong as records ({"rule": ..., details}), and only
# then are these turned into reasons (`reason`, one clause per rule, next to the rule). On the
# embedded engine a body's statements do not run in the order written (those that read only
# the function's arguments, or a comprehension's outer values, run first), so a reason built
# next to its test would be built for every write, found or not.

# Reasons about the request as a whole. bound, automated_client, agent_setting: the client's
# settings; n: how many writes the request holds.
request_denies(bound, automated_client, agent_setting, cid, client, write, n, prov) := reasons(found, null, cid, null) if {
	unreadable := {{"rule": "unreadable"} |
		# a writing request yields at least one write: anything else is a misread input
		write == true
		n == 0
	}
	tenancy := tenancy_request_checks(bound, client, n)
	provenance := provenance_request_checks(automated_client, agent_setting, client, n, prov)
	found := (unreadable | tenancy) | provenance
}

# Reasons about one write: the request itself (i null), or entry i of a batch/transaction.
# req: its request; res: its resulting resource; cur: its stored version (false: not given);
# c: the client's settings. Each family is entered only when the client has settings for it,
# and is handed only the parts of the write it reads (see README.md: what keeps this fast).
per_write_denies(i, req, res, cur, c, cid, tenant, prov) := reasons(found, w, cid, tenant) if {
	t := object.get(req, "resource_type", null)
	act := object.get(req, "interaction", null)

	# the write carries its resulting resource / its stored version
	result := count([1 | is_object(res); res.resourceType == t]) == 1
	stored := is_object(cur)

	# ---- who may write what
	types := {{"rule": "type"} |
		is_string(t)
		not t in object.get(c, "write_types", [])
	}
	operations := {{"rule": "operation", "operation": op} |
		op := object.get(req, "operation", null)
		is_string(op)
		not op in object.get(c, "operations", [])
	}
	conditionals := {{"rule": "conditional"} |
		req.conditional == true
		object.get(c, "conditional_writes", false) != true
	}

	# what the content rules need: the resulting resource, and the stored version (null: none)
	no_result := {{"rule": "no_result"} |
		act in produces
		result == false
		content_rules(c, t)
	}
	no_current := {{"rule": "no_current"} |
		act in touches
		stored == false
		cur != null
		needs_current(c, t)
	}

	# ---- content rules (fields.rego, status.rego, tenancy.rego, provenance.rego)
	fields := {r |
		rules := c.fields[t]
		rules
		present := {p |
			result
			some p in object.get(rules, "deny", [])
			is_string(p)
			s := split(p, ".")
			v := res[s[0]] # most paths stop here
			field_present(v, s)
		}
		extra := [ks | result; is_array(rules.allow); ks := object.keys(object.remove(res, rules.allow))]
		some r in field_checks(rules, present, extra)
	}
	status := {r |
		rule := c.status[t]
		rule
		element := rule.element
		is_string(element)
		to := [v | result; v := object.get(res, element, null)]
		from := [v | stored; v := object.get(cur, element, null)]
		some r in status_checks(act, rule, to, from)
	}
	tenancy := {r |
		c.tenant_boundary == true
		res_codes := [codes | act in produces; result; codes := tenant_codes(object.get(res, ["meta", "tag"], []))]
		cur_codes := [codes | act in touches; stored; codes := tenant_codes(object.get(cur, ["meta", "tag"], []))]
		some r in tenancy_checks(tenant, res_codes, cur_codes)
	}
	provenance := {r |
		c.automated == true
		some r in provenance_targets(t, object.get(req, "id", null), prov)
	}

	found := ((((((((types | operations) | conditionals) | no_result) | no_current) | fields) | status) | tenancy) | provenance)
	w := {"i": i, "type": t, "id": object.get(req, "id", null), "interaction": act}
}

# The reasons for these records (none found: nothing to say). w: the write (null for the
# request as a whole): its index i in the bundle (or null), type, id and interaction.
reasons(found, w, cid, tenant) := set() if {
	found == set()
} else := {m |
	some r in found
	m := described(r, w, cid, tenant)
}

# A record without a reason (a rule added without its `reason` clause, or a part of the message
# undefined) still denies: it must never vanish.
described(r, w, cid, tenant) := m if {
	m := reason(r, w, cid, tenant)
} else := concat("", ["policy rule ", shown(object.get(r, "rule", null)), " denies this write"])

# Holds for the written types of review types (none once a reviewer approved). c: the client's
# settings.
holds(any, c, held, ctx) := type_holds(c, held, ctx) if {
	any == true
	count(object.get(ctx, "approvals", [])) == 0
} else := set()

reason(r, _, _, _) := "the writes of this request could not be read" if r.rule == "unreadable"

reason(r, w, cid, _) := concat("", [shown(w.type), " writes are not allowed for client ", who(cid)]) if r.rule == "type"

reason(r, _, cid, _) := concat("", ["operation ", shown(r.operation), " is not allowed by policy for client ", who(cid)]) if r.rule == "operation"

reason(r, w, cid, _) := concat("", [label(w), shown(w.interaction), " is not allowed for client ", who(cid)]) if r.rule == "conditional"

reason(r, w, _, _) := concat("", [label(w), "the resulting ", shown(w.type), " is not available to policy"]) if r.rule == "no_result"

reason(r, w, _, _) := concat("", [label(w), "the stored version of ", target(w), " was not provided to policy"]) if r.rule == "no_current"

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

# Interactions that produce a resource (`resource` is the result) and that touch a stored one
# (`current` is the stored version: an object, or null when there is none).
produces := {"create", "create-conditional", "update", "update-conditional", "patch", "patch-conditional"}

touches := {"update", "update-conditional", "patch", "patch-conditional", "delete", "delete-conditional"}

# c: the client's settings; t: the written type.
content_rules(c, t) if c.fields[t]

content_rules(c, t) if c.status[t]

content_rules(c, _) if tenant_bound(c)

needs_current(c, t) if c.status[t]

needs_current(c, _) if tenant_bound(c)

# How reasons about a write start: nothing for the request itself, "entry i: " in a bundle.
label(w) := "" if w.i == null
else := sprintf("entry %d: ", [w.i])

# How a write names its target in reasons: Type/id, or the type for a create / conditional write.
target(w) := concat("/", [shown(w.type), shown(w.id)]) if is_string(w.id)
else := concat("", [shown(w.type), " (no id)"])

# The client as reasons name it.
who(cid) := shown(cid) if is_string(cid)
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
