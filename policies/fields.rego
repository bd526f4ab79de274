# Field allow/deny lists per client and resource type (data: clients.<id>.fields.<Type>).
# A disallowed field present in the resulting resource is a deny naming its path: never stripped.
#   deny:  element paths, dot-separated, up to 4 steps, arrays crossed at any step ("extension",
#          "meta.security", "component.extension"); present whatever its value. A longer path
#          cannot be checked and denies every write of that type.
#   allow: the top-level elements the client may send ("resourceType" is always allowed).
package fhir.writeback

import rego.v1

# rules: the client's field rules for the written type; present: the `deny` paths found in the
# resulting resource; extra: [the top-level elements of the resulting resource that the `allow`
# list does not name] (empty without an `allow` list or a resulting resource).
# (per_write_denies finds them: see writeback.rego.)
field_checks(rules, present, extra) := (denied | unlisted) | unchecked if {
	denied := {{"rule": "field", "path": p} | some p in present}
	unlisted := {{"rule": "unlisted", "element": k} |
		some ks in extra
		some k in ks
		k != "resourceType"
	}
	unchecked := {{"rule": "unchecked", "path": p} |
		some p in object.get(rules, "deny", [])
		not checkable(p)
	}
}

reason(r, w, cid, _) := concat("", [label(w), w.type, ".", r.path, " is not allowed for client ", who(cid)]) if r.rule == "field"

reason(r, w, cid, _) := concat("", [label(w), w.type, ".", shown(r.element), " is not allowed for client ", who(cid)]) if r.rule == "unlisted"

reason(r, w, _, _) := concat("", [label(w), "field rule ", shown(r.path), " for ", w.type, " cannot be checked"]) if r.rule == "unchecked"

checkable(p) if {
	is_string(p)
	count(split(p, ".")) <= 4
}

# Is there an element at path s, given v, the element at its first step (arrays crossed at
# every step)? Written out per length: the embedded engine has no recursion.
field_present(_, s) if count(s) == 1

field_present(v, s) if {
	count(s) == 2
	has(v, s[1])
}

field_present(v, s) if {
	count(s) == 3
	is_object(v)
	has(v[s[1]], s[2])
}

field_present(vs, s) if {
	count(s) == 3
	is_array(vs)
	some v in vs
	is_object(v)
	has(v[s[1]], s[2])
}

field_present(v, s) if {
	count(s) == 4
	is_object(v)
	u := v[s[1]]
	is_object(u)
	has(u[s[2]], s[3])
}

field_present(v, s) if {
	count(s) == 4
	is_object(v)
	is_array(v[s[1]])
	some u in v[s[1]]
	is_object(u)
	has(u[s[2]], s[3])
}

field_present(vs, s) if {
	count(s) == 4
	is_array(vs)
	some v in vs
	is_object(v)
	u := v[s[1]]
	is_object(u)
	has(u[s[2]], s[3])
}

field_present(vs, s) if {
	count(s) == 4
	is_array(vs)
	some v in vs
	is_object(v)
	is_array(v[s[1]])
	some u in v[s[1]]
	is_object(u)
	has(u[s[2]], s[3])
}

# x (an object, or an array of objects) has key k.
has(x, k) if {
	is_object(x)
	_ = x[k]
}

has(x, k) if {
	is_array(x)
	some e in x
	is_object(e)
	_ = e[k]
}
