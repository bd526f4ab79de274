# Writes held for a human review while `context.approvals` is empty (data: review).
#   high_impact: {types: [...], automated_only: true}  writes of these types (by automated clients
#                unless automated_only is false)
#   after_hours: {types, start "HH:MM", end "HH:MM", utc_offset_minutes, days ["Mon", ...]}
#                writes of these types outside [start, end) local time on the listed days
#                (a fixed offset: no daylight saving). `context.time` is RFC 3339 UTC
#                ("...Z"); an unreadable time counts as outside.
# A held write gets review: true and allow: false, with these reasons; once a reviewer approved,
# the same write is allowed (deny rules still apply).
package fhir.writeback

import rego.v1

# c: the client's settings; types: the types the request writes; ctx: its context.
type_holds(c, types, ctx) := high_impact_holds(count(hi) > 0, hi, c) | after_hours_holds(count(ah) > 0, ah, ctx) if {
	hi := {t | some t in types; t in review_settings.high_impact.types}
	ah := {t | some t in types; t in review_settings.after_hours.types}
}

# (Each check runs only when a written type is concerned: `applies` comes first. On the embedded
# engine a function's other statements may run before its body's first test.)
high_impact_holds(applies, held, c) := {msg | some t in held; msg := concat("", [t, " is a high-impact write and needs review"])} if {
	applies == true
	high_impact_client(c, review_settings.high_impact)
} else := set()

after_hours_holds(applies, held, ctx) := {msg | some t in held; msg := concat("", [t, " writes outside business hours need review"])} if {
	applies == true
	not within_hours(object.get(ctx, "clock", null), object.get(ctx, "time", null), review_settings.after_hours)
} else := set()

high_impact_client(c, _) if automated(c)

high_impact_client(_, hi) if hi.automated_only == false
weekdays := ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"]

# clock: context.clock, the sidecar's reading of context.time ({weekday: 0 = Sunday .. 6, minute:
# minute of the UTC day}; README.md); time: context.time, read here when there is no clock.
within_hours(clock, time, ah) if {
	local := local_clock(clock, time, object.get(ah, "utc_offset_minutes", 0))
	weekdays[local.day] in object.get(ah, "days", weekdays)
	local.minute >= minute_of_day(ah.start)
	local.minute < minute_of_day(ah.end)
}

minute_of_day(hhmm) := (num(substring(hhmm, 0, 2)) * 60) + num(substring(hhmm, 3, 2)) if {
	is_string(hhmm)
	count(hhmm) == 5
	substring(hhmm, 2, 1) == ":"
}

# {day: 0 = Sunday .. 6, minute: minute of the local day} at this offset from UTC.
local_clock(clock, time, offset) := shift_clock(clock.weekday, clock.minute, offset) if {
	is_number(clock.weekday)
	is_number(clock.minute)
} else := shift_clock(weekday(y, m, d), (num(substring(t, 11, 2)) * 60) + num(substring(t, 14, 2)), offset) if {
	# "YYYY-MM-DDTHH:MM:SS[.f]Z", without time builtins (the embedded engine has none; the result is
	# the same on every engine)
	t := time
	is_string(t)
	endswith(t, "Z")
	substring(t, 4, 1) == "-"
	substring(t, 10, 1) == "T"
	substring(t, 13, 1) == ":"
	y := num(substring(t, 0, 4))
	m := num(substring(t, 5, 2))
	d := num(substring(t, 8, 2))
}

shift_clock(day, minute, offset) := {"day": mod(day + shift, 7), "minute": total - (shift * 1440)} if {
	is_number(offset)
	total := minute + offset
	shift := floor(total / 1440)
}

# Day of the week of a Gregorian date, 0 = Sunday (T. Sakamoto's method).
weekday(y, m, d) := mod(((((yy + floor(yy / 4)) - floor(yy / 100)) + floor(yy / 400)) + month_offsets[m - 1]) + d, 7) if {
	yy := y - march_shift(m)
}

month_offsets := [0, 3, 2, 5, 0, 3, 5, 1, 4, 6, 2, 4]

march_shift(m) := 1 if m < 3
else := 0

# A number from digits. The embedded engine keeps to_number("02") as a number spelt "02" that
# compares wrongly (02 == 2 is false there); `+ 1 - 1` makes it a plain number (`+ 0` does not).
num(s) := (to_number(s) + 1) - 1

# x mod n for integers, without `%`: the embedded engine's `%` is wrong for larger numbers
# (20790 % 7 gives 2 there).
mod(x, n) := x - (floor(x / n) * n)
