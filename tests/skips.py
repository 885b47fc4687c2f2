"""Every skip the test suite may take, by name, and the check that no other skip passes silently.

CI (`make test`, `.ci/run`) has every tool the tests use: the real helm binary and the `train` extra
(torch, transformers, peft, bitsandbytes). A test whose tool is missing there fails; it does not skip, so
a broken `scripts/fetch-helm.sh` or a lost extra cannot turn 100 tests into a green run. The only skips
are the ones in SKIPS below:

- a developer's explicit opt-out of a whole tool, ``FTRECIPE_TESTS_WITHOUT=helm`` or ``=torch`` (or
  ``=helm,torch``), to run a subset on a machine without it; `make test` unsets the variable;
- limits of a platform, named one by one with why CI never meets them.

This module is a pytest plugin (tests/conftest.py loads it): its hooks turn any other skip, whether a bare
``pytest.skip``, an ``importorskip`` or a ``skipif`` marker, in a test or at collection, into a failure that
says what skipped and how to fix it. Expected failures (``xfail``) are not skips and pass through.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Final

import pytest

OPT_OUT_ENV: Final = "FTRECIPE_TESTS_WITHOUT"


@dataclass(frozen=True)
class AllowedSkip:
    """A skip the suite may take: what its reason says, why it is legitimate, and the tool it is about."""

    reason: re.Pattern[str]  # searched in the skip's reason
    why: str
    # A required tool: the skip is allowed only while the developer opted out of it (OPT_OUT_ENV).
    tool: str | None = None
    how_to_get: str = ""


SKIPS: Final[dict[str, AllowedSkip]] = {
    "without-helm": AllowedSkip(
        reason=re.compile(r"^helm v3 not available"),  # tests/support/helm.py, fixture `helm`
        why="a developer without a helm binary opted out of the chart and install tests",
        tool="helm",
        how_to_get="run `bash scripts/fetch-helm.sh` (or set HELM_BIN, or put helm v3 on PATH)",
    ),
    "without-torch": AllowedSkip(
        # The importorskip guards of the training, evaluation and tiny-model tests.
        reason=re.compile(
            r"the 'train' extra|could not import '(torch|transformers|peft|accelerate|trl|bitsandbytes)'"
        ),
        why="a developer without the `train` extra opted out of the training and local-model tests",
        tool="torch",
        how_to_get="install the `train` extra: `make setup` (the CPU torch of the Makefile, then `.[train,dev]`)",
    ),
    "no-proc": AllowedSkip(
        reason=re.compile(r"^finds the ranks through /proc$"),  # tests/test_train_resume.py
        why="reading another process's environment needs Linux's /proc; CI runs on Linux",
    ),
}


def opted_out(environ: dict[str, str] | os._Environ[str] = os.environ) -> frozenset[str]:
    """The tools the developer chose to run without (``FTRECIPE_TESTS_WITHOUT=helm,torch``)."""
    return frozenset(tool.strip() for tool in environ.get(OPT_OUT_ENV, "").split(",") if tool.strip())


def refusal(reason: str, without: frozenset[str]) -> str | None:
    """Why a skip with this reason fails the run, or None when SKIPS allows it."""
    for name, allowed in SKIPS.items():
        if not allowed.reason.search(reason):
            continue
        if allowed.tool is None or allowed.tool in without:
            return None
        return (
            f"{allowed.tool} is required, but the test would skip ({reason}); {allowed.how_to_get}. "
            f"To run without {allowed.tool} on purpose, set {OPT_OUT_ENV}={allowed.tool} "
            f"(skip {name!r} in tests/skips.py; never in CI)"
        )
    return (
        f"skipped without being listed in tests/skips.py: {reason!r}. Fix what makes it skip, or add it to "
        "SKIPS with why it is legitimate"
    )


def _skip_reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: reason")
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _refuse_unlisted_skip(report: pytest.CollectReport | pytest.TestReport) -> None:
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    problem = refusal(_skip_reason(report), opted_out())
    if problem is not None:
        report.outcome = "failed"
        report.longrepr = problem


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    report = yield
    _refuse_unlisted_skip(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> object:
    report = yield
    _refuse_unlisted_skip(report)
    return report
