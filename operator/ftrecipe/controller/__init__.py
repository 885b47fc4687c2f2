"""The cluster side of ftrecipe: pure Job manifests for the planner's actions (`manifests`) and what a
Job's init container fetches before its phase runs (`inputs`, the `ftrecipe fetch-inputs` command)."""
