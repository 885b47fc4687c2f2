"""The `ftrecipe` command line: thin wiring around the library's pure functions."""
