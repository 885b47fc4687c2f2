"""The skip policy (tests/skips.py): a missing helm or `train` extra fails the run unless the developer
opted out by name, and a skip nobody listed fails it always. Each case runs pytest in a subprocess with
this repository's conftest and settings, as `make test` does."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from skips import OPT_OUT_ENV, SKIPS, opted_out, refusal

ROOT = Path(__file__).resolve().parents[1]


def run_pytest(
    tmp_path: Path, *args: str, without: str | None = None, plugin: str = ""
) -> subprocess.CompletedProcess[str]:
    """pytest on `args` from the repository root (its pyproject settings and tests/conftest.py), with
    FTRECIPE_TESTS_WITHOUT set to `without` (or unset), and `plugin` (Python source) loaded first."""
    env = {k: v for k, v in os.environ.items() if k not in (OPT_OUT_ENV, "HELM_BIN", "PYTEST_ADDOPTS")}
    # No helm on PATH either: only the folders without one.
    env["PATH"] = os.pathsep.join(
        folder for folder in env.get("PATH", "").split(os.pathsep) if not (Path(folder) / "helm").exists()
    )
    if without is not None:
        env[OPT_OUT_ENV] = without
    extra: list[str] = []
    if plugin:
        (tmp_path / "policy_case_plugin.py").write_text(plugin)
        env["PYTHONPATH"] = str(tmp_path)
        extra = ["-p", "policy_case_plugin"]
    if not args[0].startswith("tests/"):
        # A test file outside tests/ gets no tests/conftest.py: load the policy as it does.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(ROOT / "tests")]))
        extra += ["-p", "skips"]
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "bt"),
         *extra, *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip


def outcome_line(proc: subprocess.CompletedProcess[str]) -> str:
    """pytest's last line without warnings and duration, e.g. `1 failed`."""
    last = re.sub(r" in [\d.]+s.*$", "", proc.stdout.strip().splitlines()[-1])
    return ", ".join(part for part in last.split(", ") if "warning" not in part)


def test_every_listed_skip_says_why() -> None:
    assert sorted(SKIPS) == ["no-proc", "without-helm", "without-torch"]
    assert all(len(allowed.why) > 30 for allowed in SKIPS.values())
    assert {allowed.tool for allowed in SKIPS.values()} == {"helm", "torch", None}


def test_opt_out_is_read_by_name() -> None:
    assert opted_out({}) == frozenset()
    assert opted_out({OPT_OUT_ENV: "helm, torch"}) == {"helm", "torch"}
    # A listed platform skip passes; a tool's skip only when opted out; anything else never.
    assert refusal("finds the ranks through /proc", frozenset()) is None
    assert refusal("could not import 'torch': No module named 'torch'", frozenset({"torch"})) is None
    assert "torch is required" in str(refusal("training needs the 'train' extra", frozenset({"helm"})))
    assert "without being listed" in str(refusal("flaky on Tuesdays", frozenset({"helm", "torch"})))


# A test file per case, written into tmp_path and run by the subprocess.
BARE_SKIP = "import pytest\n\ndef test_it():\n    pytest.skip('not today')\n"
MISSING_EXTRA = (
    "import pytest\n\npytest.importorskip('no_such_module_ftrecipe', reason=\"needs the 'train' extra\")\n\n"
    "def test_it():\n    pass\n"
)
XFAIL = "import pytest\n\n@pytest.mark.xfail(reason='known', strict=True)\ndef test_it():\n    assert False\n"


def test_a_skip_nobody_listed_fails_the_run(tmp_path: Path) -> None:
    (tmp_path / "test_case.py").write_text(BARE_SKIP)
    for without in (None, "helm,torch"):  # no opt-out excuses it
        proc = run_pytest(tmp_path, str(tmp_path / "test_case.py"), without=without)
        assert proc.returncode == 1, proc.stdout
        assert outcome_line(proc) == "1 failed"
        assert "skipped without being listed in tests/skips.py: 'not today'" in proc.stdout


def test_a_missing_train_extra_fails_unless_opted_out(tmp_path: Path) -> None:
    (tmp_path / "cases").mkdir()
    (tmp_path / "cases" / "test_case.py").write_text(MISSING_EXTRA)
    (tmp_path / "cases" / "test_other.py").write_text("def test_other():\n    pass\n")
    proc = run_pytest(tmp_path, str(tmp_path / "cases"))
    assert proc.returncode == 2, proc.stdout  # a collection error: pytest stops before running anything
    assert outcome_line(proc) == "1 error"
    assert "torch is required, but the test would skip (needs the 'train' extra)" in proc.stdout
    assert f"set {OPT_OUT_ENV}=torch" in proc.stdout

    opted = run_pytest(tmp_path, str(tmp_path / "cases"), without="torch")
    assert opted.returncode == 0, opted.stdout
    assert outcome_line(opted) == "1 passed, 1 skipped"


def test_xfail_is_not_a_skip(tmp_path: Path) -> None:
    (tmp_path / "test_case.py").write_text(XFAIL)
    proc = run_pytest(tmp_path, str(tmp_path / "test_case.py"))
    assert (proc.returncode, outcome_line(proc)) == (0, "1 xfailed"), proc.stdout


# The real helm fixture and the real helm tests, with the binary gone: the repository's copy points nowhere,
# no HELM_BIN, no helm on PATH.
HELM_TESTS = (
    "tests/test_fixture_helm.py::test_helm_version_is_v3",
    "tests/test_fixture_helm.py::test_helm_renders_a_chart",
)
NO_HELM = (
    "from pathlib import Path\nimport support.helm\n\n"
    "support.helm.CACHED_HELM = Path('/nonexistent/ftrecipe-test/helm')\n"
)


def test_without_helm_the_helm_tests_fail_unless_opted_out(tmp_path: Path) -> None:
    proc = run_pytest(tmp_path, *HELM_TESTS, plugin=NO_HELM)
    assert proc.returncode == 1, proc.stdout
    assert outcome_line(proc) == "2 errors"
    assert "helm is required, but the test would skip (helm v3 not available" in proc.stdout
    assert "/nonexistent/ftrecipe-test/helm): absent" in proc.stdout

    opted = run_pytest(tmp_path, *HELM_TESTS, plugin=NO_HELM, without="helm")
    assert opted.returncode == 0, opted.stdout
    assert outcome_line(opted) == "2 skipped"
