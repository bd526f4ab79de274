# Field allow/deny lists per client and resource type (data: clients.<id>.fields.<Type>).
# A disallowed field present in the resulting resource is a deny naming its path: never stripped.
#   deny:  element paths, dot-separated, up to 4 steps, arrays crossed at any step ("extension",
#          "meta.security", "component.extension"); present whatever its value. A longer path
#          cannot be checked and denies every write of that type.
#   allow: the top-level elements the client may send ("resourceType" is always allowed).
package fhir.writeback

import rego.v1

field_denies(inp, label, w, c) := field_checks(inp, label, w, c.fields[w.request.resource_type]) if {
	c.fields[w.request.resource_type]
} else := set()

field_checks(inp, label, w, rules) := (denied | unlisted) | unchecked if {
	denied := {msg |
		has_result(w)
		some p in object.get(rules, "deny", [])
		is_string(p)
		s := split(p, ".")
		has(w.resource, s[0]) # most paths stop here
		field_present(w.resource, s)
		msg := concat("", [label, w.request.resource_type, ".", p, " is not allowed for client ", who(inp)])
	}
	unlisted := {msg |
		has_result(w)
		is_array(rules.allow)
		some k in object.keys(w.resource)
		k != "resourceType"
		not k in rules.allow
		msg := concat("", [label, w.request.resource_type, ".", shown(k), " is not allowed for client ", who(inp)])
	}
	unchecked := {msg |
		some p in object.get(rules, "deny", [])
		not checkable(p)
		msg := concat("", [label, "field rule ", shown(p), " for ", w.request.resource_type, " cannot be checked"])
	}
} else := set()

checkable(p) if {
	is_string(p)
	count(split(p, ".")) <= 4
}

# Is there an element at this path (arrays crossed at every step)? Written out per length: the
# embedded engine has no recursion, and a function returning part of the input is slow there.
field_present(r, s) if {
	count(s) == 1
	has(r, s[0])
}

field_present(r, s) if {
	count(s) == 2
	has(r[s[0]], s[1])
}

field_present(r, s) if {
	count(s) == 3
	v := r[s[0]]
	is_object(v)
	has(v[s[1]], s[2])
}

field_present(r, s) if {
	count(s) == 3
	is_array(r[s[0]])
	some v in r[s[0]]
	is_object(v)
	has(v[s[1]], s[2])
}

field_present(r, s) if {
	count(s) == 4
	v := r[s[0]]
	is_object(v)
	u := v[s[1]]
	is_object(u)
	has(u[s[2]], s[3])
}

field_present(r, s) if {
	count(s) == 4
	v := r[s[0]]
	is_object(v)
	is_array(v[s[1]])
	some u in v[s[1]]
	is_object(u)
	has(u[s[2]], s[3])
}

field_present(r, s) if {
	count(s) == 4
	is_array(r[s[0]])
	some v in r[s[0]]
	is_object(v)
	u := v[s[1]]
	is_object(u)
	has(u[s[2]], s[3])
}

field_present(r, s) if {
	count(s) == 4
	is_array(r[s[0]])
	some v in r[s[0]]
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
