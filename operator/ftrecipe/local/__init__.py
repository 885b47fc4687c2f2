"""`ftrecipe run`: a FinetuneRecipe on one machine, each phase a local process instead of a Job.

`layout` resolves the recipe's `local` paths and the work folder, `progress` reads the phase commands'
output, `display` shows it (rich at a terminal, plain lines elsewhere) and `runner` is the imperative
shell around the operator's pure planner and status.
"""
