# decision_for(inp): the rules of `decision` (writeback.rego) over an argument, for tests.
# Tests call it with their input: `with input as` does not run on the embedded engine (regopy 1.5)
# for rules like these. The text is writeback.rego's `decision`, word for word, with `inp` for
# `input`, and with its last two branches as full_decision(inp), so tests can compare the short
# paths with every rule. tests/test_policy_shape.py holds the two texts equal, and rewrites this
# block after an edit of `decision`: .venv/bin/python -m tests.test_policy_shape
# It lives in a *_test.rego file so that the sidecar does not load it: on the embedded engine
# every query costs a little more for every rule loaded.
package fhir.writeback

import rego.v1

# >>> decision_for
decision_for(inp) := allowed if {
	# A plain write: a type the client may write, and no content, tenancy, provenance or review
	# setting applies to it, so every rule would find nothing (test_short_path_is_the_full_path).
	c := clients[inp.client.id]
	not c.tenant_boundary
	not c.automated
	count([1 | is_array(inp.entries)]) == 0 # not a batch/transaction
	r := inp.request
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
	c := clients[inp.client.id]
	not c.tenant_boundary
	not c.automated
	inp.request.write == true
	is_array(inp.entries)
	plain := plain_types(c)
	n := count([1 | some e in inp.entries; e.request.write == true])
	n > 0
	count([1 |
		some e in inp.entries
		r := e.request
		r.write == true
		r.operation == null
		r.conditional == false
		r.resource_type in plain
	]) == n
} else := full_decision(inp)

full_decision(inp) := verdict(d, h) if {
	# Every rule. The writes are the request itself, or each writing entry of a batch/transaction.
	cid := inp.client.id
	c := clients[cid]
	is_object(c)
	r := inp.request
	bundle := count([1 | is_array(inp.entries)]) == 1
	single := [true | bundle == false; r.write == true]
	each := [i | bundle == true; some i; e := inp.entries[i]; e.request.write == true]
	tenant := object.get(inp.client, "tenant", null)
	prov := provenance_header(object.get(c, "automated", null) == true, object.get(r, "headers", {}), object.get(inp, "context", {}))
	d := (request_denies(object.get(c, "tenant_boundary", null) == true, object.get(c, "automated", null) == true, object.get(c, "provenance_agent", null), cid, inp.client, object.get(r, "write", null), count(single) + count(each), prov) | {m |
		some _ in single
		some m in per_write_denies(null, r, object.get(inp, "resource", false), object.get(inp, "current", false), c, cid, tenant, prov)
	}) | {m |
		some i in each
		e := inp.entries[i]
		some m in per_write_denies(i, e.request, object.get(e, "resource", false), object.get(e, "current", false), c, cid, tenant, prov)
	}
	types := {t | some _ in single; t := r.resource_type} | {t | some i in each; t := inp.entries[i].request.resource_type}
	held := {t | some t in types; t in review_settings.high_impact.types} | {t | some t in types; t in review_settings.after_hours.types}
	h := holds(held != set(), c, held, object.get(inp, "context", {}))
} else := verdict({"client has no policy entry"}, set())
# <<< decision_for
