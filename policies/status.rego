# Status rules per client and resource type (data: clients.<id>.status.<Type>):
#   element:     the status element ("status", "docStatus")
#   write:       the values the resulting resource may carry (absent counts as not allowed)
#   locked:      stored values that make the resource unchangeable for this client (also delete)
#   transitions: {stored value: [values it may become]}; keeping the stored value is always allowed
package fhir.writeback

import rego.v1

# act: the write's interaction; rule: the client's status rule for its type; to: [the element's
# value in the resulting resource] (empty without one); from: [its value in the stored version]
# (empty without one). An absent element counts as null. (per_write_denies: writeback.rego.)
status_checks(act, rule, to, from) := (values | locked) | transitions if {
	element := rule.element

	values := {{"rule": "status", "element": element, "value": v, "allowed": rule.write} |
		is_array(rule.write)
		some v in to
		not v in rule.write
	}

	locked := {{"rule": "locked", "element": element, "value": v} |
		act in touches
		some v in from
		v in object.get(rule, "locked", [])
	}

	transitions := {{"rule": "transition", "element": element, "from": from_value, "to": to_value} |
		act in produces
		is_object(rule.transitions)
		some from_value in from
		is_string(from_value)
		some to_value in to
		to_value != from_value
		not to_value in object.get(rule.transitions, from_value, [])
	}
}

reason(r, w, cid, _) := concat("", [
	label(w), w.type, ".", shown(r.element), " ", shown(r.value), " is not allowed for client ", who(cid),
	" (allowed: ", concat(", ", [shown(x) | some x in r.allowed]), ")",
]) if r.rule == "status"

reason(r, w, cid, _) := concat("", [
	label(w), target(w), " is ", shown(r.element), " ", shown(r.value), " and may not be changed by client ", who(cid),
]) if r.rule == "locked"

reason(r, w, cid, _) := concat("", [
	label(w), target(w), ".", shown(r.element), " may not go from ", shown(r.from), " to ", shown(r.to),
	" for client ", who(cid),
]) if r.rule == "transition"
