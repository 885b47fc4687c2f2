"""The phases' contract, shared by the Jobs (`ftrecipe.controller`) and `ftrecipe run` (`ftrecipe.local`):
what each phase runs (`commands`) and what it needs on disk first (`inputs`, the `fetch-inputs` step)."""
