# Status rules per client and resource type (data: clients.<id>.status.<Type>):
#   element:     the status element ("status", "docStatus")
#   write:       the values the resulting resource may carry (absent counts as not allowed)
#   locked:      stored values that make the resource unchangeable for this client (also delete)
#   transitions: {stored value: [values it may become]}; keeping the stored value is always allowed
package fhir.writeback

import rego.v1

status_denies(inp, label, w, c) := status_checks(inp, label, w, c.status[w.request.resource_type]) if {
	c.status[w.request.resource_type]
} else := set()

status_checks(inp, label, w, rule) := (values | locked) | transitions if {
	element := rule.element
	is_string(element)

	values := {msg |
		is_array(rule.write)
		has_result(w)
		v := object.get(w.resource, element, null)
		not v in rule.write
		msg := concat("", [
			label, w.request.resource_type, ".", shown(element), " ", shown(v), " is not allowed for client ", who(inp),
			" (allowed: ", concat(", ", [shown(x) | some x in rule.write]), ")",
		])
	}

	locked := {msg |
		w.request.interaction in touches
		is_object(w.current)
		v := object.get(w.current, element, null)
		v in object.get(rule, "locked", [])
		msg := concat("", [
			label, target(w), " is ", shown(element), " ", shown(v), " and may not be changed by client ", who(inp),
		])
	}

	transitions := {msg |
		w.request.interaction in produces
		is_object(rule.transitions)
		is_object(w.current)
		from := object.get(w.current, element, null)
		is_string(from)
		has_result(w)
		to := object.get(w.resource, element, null)
		to != from
		not to in object.get(rule.transitions, from, [])
		msg := concat("", [
			label, target(w), ".", shown(element), " may not go from ", shown(from), " to ", shown(to),
			" for client ", who(inp),
		])
	}
} else := set()
