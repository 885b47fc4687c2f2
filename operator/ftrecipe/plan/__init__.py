"""Planning a recipe's phases: pure functions over the spec (what to run, what can be reused)."""
