"""What the operator keeps of each recipe between events (thousands of them): only the metadata it reads,
and the spec and statuses as compact JSON text that decodes to what the watch showed."""

from __future__ import annotations

import copy
import json
from typing import Any

from ftrecipe.controller.handlers import RecipeState

SPEC: dict[str, Any] = {
    "assistant": {"source": {"git": {"url": "https://github.com/example-org/support-assistant.git"}}},
    "training": {"baseModel": {"huggingFace": {"id": "meta-llama/Llama-3.1-8B-Instruct"}}, "epochs": 3},
    "evaluation": {"enabled": True, "thresholds": [0.5, 0.9]},
}
STATUS: dict[str, Any] = {
    "phase": "Training",
    "observedGeneration": 2,
    "conditions": [{"type": "Ready", "status": "False", "reason": "Training", "message": "naïve café ✓"}],
}


def watched_body() -> dict[str, Any]:
    """A recipe as the API server sends it after `kubectl apply`: managedFields, kubectl's copy of the
    whole object, a resourceVersion that changes on every write."""
    return {
        "apiVersion": "ftrecipe.dev/v1alpha1",
        "kind": "FinetuneRecipe",
        "metadata": {
            "name": "support",
            "namespace": "ml",
            "uid": "0b6f5d7e-1111-2222-3333-444455556666",
            "generation": 2,
            "resourceVersion": "81723",
            "creationTimestamp": "2026-12-03T08:00:00Z",
            "labels": {"team": "support"},
            "annotations": {
                "ftrecipe.dev/retry": "1764748800",
                "kubectl.kubernetes.io/last-applied-configuration": json.dumps({"spec": SPEC}) * 20,
            },
            "managedFields": [{"manager": "kubectl", "operation": "Apply", "fieldsV1": {"f:spec": {}}}],
        },
        "spec": copy.deepcopy(SPEC),
        "status": copy.deepcopy(STATUS),
    }


def test_recipe_state_keeps_only_what_the_operator_reads() -> None:
    state = RecipeState(watched_body())

    assert not hasattr(state, "__dict__")  # slots: no per-instance dict of attributes
    assert state.meta == {
        "name": "support",
        "namespace": "ml",
        "uid": "0b6f5d7e-1111-2222-3333-444455556666",
        "generation": 2,
        "labels": {"team": "support"},
        "annotations": {"ftrecipe.dev/retry": "1764748800"},
    }
    # Spec and status are one string each, not trees of dicts and lists.
    assert isinstance(state.spec, str) and isinstance(state.watched, str)
    assert state.written is None
    assert state.phase == "Training"

    body = state.body()
    assert dict(body) == {
        "apiVersion": "ftrecipe.dev/v1alpha1",
        "kind": "FinetuneRecipe",
        "metadata": state.meta,
        "spec": SPEC,
    }
    assert state.status() == STATUS


def test_recipe_state_prefers_the_status_it_wrote_until_told_to_forget_it() -> None:
    state = RecipeState(watched_body())
    written = {"phase": "Evaluating", "observedGeneration": 2, "message": "scoring 12 of 40 turns"}

    state.write(written)
    assert state.status() == written
    assert state.phase == "Evaluating"

    # A later watch event (older than the write, as a busy watch can be) leaves the written one in force.
    state.see(watched_body())
    assert state.status() == written
    assert state.phase == "Evaluating"

    state.write(None)  # paused in favour of another replica: what it wrote may be stale
    assert state.status() == STATUS
    assert state.phase == "Training"


def test_recipe_state_of_a_recipe_never_planned() -> None:
    body = watched_body()
    del body["status"]
    del body["metadata"]["annotations"]

    state = RecipeState(body)

    assert state.status() is None
    assert state.phase is None
    assert "annotations" not in state.meta
    assert state.body()["spec"] == SPEC
