"""The phase hashes of the example recipes, written out.

A phase hash names the Job and the bundle prefix of a phase (`<recipe>-<phase>-<hash8>`,
`<output>/<recipe>/<phase>-<hash12>/`); a finished phase is found again by it. CHANGING THESE VALUES
RE-RUNS EVERY USER'S FINISHED WORK once they edit a recipe (and every unfinished recipe planned before
`status.plannedWith` existed): a new field with a non-empty default, a renamed field, a changed default, a
field moved in or out of `IRRELEVANT`, a change of the canonical JSON form. That may be right, but it
needs a migration note (docs/operator.md, "Upgrading the operator": what re-runs, and why), written in
the same change that updates the literals below. The operator tests use these literals for the Job names
they expect (tests/test_operator.py `expected_job`), so they fail with this one.
"""

from __future__ import annotations

from pathlib import Path

from ftrecipe import __version__
from ftrecipe.api import load_recipe
from ftrecipe.plan.cache_key import Phase, phase_hashes, phase_prefix, version_series
from ftrecipe.plan.planner import job_name

RECIPES = Path(__file__).resolve().parents[1] / "examples" / "recipes"
# The hashes include the operator's major.minor version: a new one changes them all (as documented).
PINNED_VERSION_SERIES = "0.1"
MINIMAL_HASHES: dict[Phase, str] = {
    "data": "4c09037d54c72f3381d57da85f2987505921c6aca08154ffd7a49117954d9a7f",
    "train": "0c5185b42170e1594403af18506dd0ac8c30b53b9e24dd579da50d76e5741a09",
    "evaluate": "f2bb9672e46523e483492fe196300ffeab0504eeb6174f8d3570361f1a7c052c",
}
FULL_HASHES: dict[Phase, str] = {
    "data": "07bedcb463b36b8541d611d94499486076a2497e9f25fc2ecc097ac4f4d059c8",
    "train": "0e7cf26589c5a4707bd7ea0c17b27ed25528bf0fc264a76d37b69354d60457a6",
    "evaluate": "4c44855326c78e4259c85d206f51532b8dff29598fc4fd3f34017c422cc62950",
}
HOW_TO_CHANGE = (
    "the phase hashes of an example recipe changed: every user's finished phases would run again. "
    "If intended, update the literals in tests/test_phase_hashes_pinned.py and write a migration note in "
    "docs/operator.md (Upgrading the operator)"
)


def test_the_operator_version_is_the_pinned_series() -> None:
    assert version_series(__version__) == PINNED_VERSION_SERIES, (
        f"ftrecipe {__version__}: a new major.minor changes every phase hash; pin the new ones"
    )


def test_minimal_recipe_hashes_are_pinned() -> None:
    recipe = load_recipe(RECIPES / "minimal.yaml")
    assert phase_hashes(recipe.spec, version=PINNED_VERSION_SERIES + ".0") == MINIMAL_HASHES, HOW_TO_CHANGE
    assert phase_hashes(recipe.spec, version=PINNED_VERSION_SERIES + ".7") == MINIMAL_HASHES  # a patch: same


def test_full_recipe_hashes_are_pinned() -> None:
    recipe = load_recipe(RECIPES / "full.yaml")
    assert phase_hashes(recipe.spec, version=PINNED_VERSION_SERIES + ".0") == FULL_HASHES, HOW_TO_CHANGE


def test_job_names_and_prefixes_of_the_pinned_hashes() -> None:
    assert [job_name("minimal", phase, MINIMAL_HASHES[phase]) for phase in ("data", "train", "evaluate")] == [
        "minimal-data-4c09037d",
        "minimal-train-0c5185b4",
        "minimal-eval-f2bb9672",
    ]
    assert job_name("support-assistant-llama31", "train", FULL_HASHES["train"]) == (
        "support-assistant-llama31-train-0e7cf265"
    )
    assert phase_prefix("s3://ml-artifacts/ftrecipe/", "minimal", "data", MINIMAL_HASHES["data"]) == (
        "s3://ml-artifacts/ftrecipe/minimal/data-4c09037d54c7/"
    )
