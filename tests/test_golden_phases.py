"""Golden files: what each phase runs for the example recipes, pinned byte for byte.

For every recipe in examples/recipes/ and every phase, tests/golden/<recipe>/ holds:

* ``job-<phase>.yaml``: the batch/v1 Job the operator builds (`build_job`, fixed namespace and images);
* ``local-<phase>.yaml``: what `ftrecipe run` would execute for that phase (its command line, from
  `phase_args` with a fixed work folder) and the config files it writes for it (llm.yml, rephrase.yml,
  training.yml: the same dicts `fetch-inputs` writes in a Job).

They were generated once from the code and are compared exactly, so moving code between modules is
provably behaviour-free. A change that *means* to change a Job or a command line regenerates them (so
does a new spec field or default, or a version bump: the phase hashes in names and prefixes include both):

    FTRECIPE_REGENERATE_GOLDEN=1 .venv/bin/pytest tests/test_golden_phases.py   # writes, then fails
    git diff tests/golden/                                                         # review, commit

Regenerating fails every test on purpose, so a run with the variable set never passes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from ftrecipe.api import load_recipe
from ftrecipe.controller.manifests import Images, build_job
from ftrecipe.local.layout import resolve
from ftrecipe.local.runner import phase_args
from ftrecipe.phases import inputs
from ftrecipe.plan.cache_key import PHASES, Phase, phase_hashes, phase_prefix
from ftrecipe.plan.planner import CreateJob, job_name

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "examples" / "recipes").glob("*.yaml"))
GOLDEN = Path(__file__).resolve().parent / "golden"
REGENERATE = os.environ.get("FTRECIPE_REGENERATE_GOLDEN") == "1"
NAMESPACE = "golden-ns"
# Fixed images: the defaults carry the package version, which would change every golden file on release.
IMAGES = Images(
    operator="ghcr.io/ftrecipe/ftrecipe:golden", trainer="ghcr.io/ftrecipe/ftrecipe-trainer:golden"
)
WORKDIR = Path("/golden/work")  # the local run's work folder (never created: phase_args is pure)


def _dump(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=120)


def job_text(file: Path, phase: Phase) -> str:
    loaded = load_recipe(file)
    name, spec = loaded.metadata.name, loaded.spec
    assert name is not None and spec.output.s3 is not None
    inputs_hash = phase_hashes(spec)[phase]
    action = CreateJob(phase, inputs_hash, job_name(name, phase, inputs_hash), False)
    prefix = phase_prefix(spec.output.s3.uri, name, phase, inputs_hash)
    return _dump(build_job(name, NAMESPACE, spec, action, output_prefix=prefix, images=IMAGES))


def local_text(file: Path, phase: Phase) -> str:
    local = resolve(load_recipe(file), file, WORKDIR)
    spec = local.spec
    files: dict[str, Any] = {}
    if inputs.reads_assistant(spec, phase):  # data, and evaluate with evaluation.e2e
        files[inputs.LLM_CONFIG] = inputs.llm_config(spec)
        rephrase = inputs.rephrase_config(spec) if phase == "data" else None
        if rephrase is not None:
            files[inputs.REPHRASE_CONFIG] = rephrase
    elif phase == "train":
        files[inputs.TRAINING_CONFIG] = inputs.training_config(spec)
    return _dump({"command": ["ftrecipe", *phase_args(local, phase)], "files": files})


CASES = [(file, phase) for file in RECIPES for phase in PHASES]


def _check(text: str, golden: Path) -> None:
    if REGENERATE:
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text, encoding="utf-8")
        pytest.fail(f"regenerated {golden.relative_to(ROOT)}: unset FTRECIPE_REGENERATE_GOLDEN and rerun")
    assert golden.is_file(), f"{golden} is missing: generate it with FTRECIPE_REGENERATE_GOLDEN=1"
    assert text == golden.read_text(encoding="utf-8"), f"{golden.relative_to(ROOT)} differs"


def test_examples_cover_every_phase() -> None:
    assert [file.name for file in RECIPES] == ["e2e.yaml", "full.yaml", "minimal.yaml"]
    assert len(CASES) == 9
    if not REGENERATE:
        assert sorted(str(path.relative_to(GOLDEN)) for path in GOLDEN.rglob("*.yaml")) == sorted(
            f"{file.stem}/{kind}-{phase}.yaml" for file, phase in CASES for kind in ("job", "local")
        )


@pytest.mark.parametrize(("file", "phase"), CASES, ids=[f"{f.stem}-{p}" for f, p in CASES])
def test_job_manifest_is_golden(file: Path, phase: Phase) -> None:
    _check(job_text(file, phase), GOLDEN / file.stem / f"job-{phase}.yaml")


@pytest.mark.parametrize(("file", "phase"), CASES, ids=[f"{f.stem}-{p}" for f, p in CASES])
def test_local_command_is_golden(file: Path, phase: Phase) -> None:
    _check(local_text(file, phase), GOLDEN / file.stem / f"local-{phase}.yaml")
