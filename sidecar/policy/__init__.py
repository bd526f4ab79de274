"""Policy engines behind one interface: `decide(input) -> {"allow", "reasons", "review"?}`."""
