"""The benchmark scripts still run: each one, as its own command, with tiny parameters, checked by its JSON.

All four start at once (they mostly wait: on the slow LLM, on subprocesses, on the operator), so the
module takes about as long as the slowest one. The figures are not checked against targets here, only
that they are there and make sense (docs/benchmarks.md holds the measured ones).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
TINY: dict[str, list[str]] = {
    "prepare_data_llm": ["--tests", "4", "--latency", "0.02", "--rephrases", "1", "--concurrency", "1", "4"],
    "train_throughput": ["--tests", "2", "--epochs", "1", "--batch-size", "2", "--repeats", "1"],
    "operator_scale": ["--recipes", "3", "--timeout", "60"],
    "train_gpu": ["--shape", "tiny", "--tests", "2", "--batch-size", "2", "--variants", "lora", "lora-gc"],
}
pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


class Run:
    def __init__(self, name: str, out: Path) -> None:
        self.name = name
        self.json = out / f"{name}.json"
        self.log = out / f"{name}.log"
        argv = [sys.executable, str(BENCHMARKS / f"{name}.py"), *TINY[name], "--json", str(self.json)]
        with self.log.open("w") as log:
            self.process = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        self.started = time.monotonic()

    def result(self, timeout: float = 180) -> dict[str, Any]:
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"{self.name} ran over {timeout:g} s:\n{self.log.read_text()[-3000:]}"
            ) from None
        output = self.log.read_text()
        assert code == 0, f"{self.name} exited with {code}:\n{output[-3000:]}"
        assert "| " in output, output[-2000:]  # the table
        data: dict[str, Any] = json.loads(self.json.read_text())
        assert data["benchmark"] == self.name
        assert data["machine"]["cores"] >= 1 and len(data["machine"]["load_average_at_start"]) == 3
        assert data["command"].startswith(f".venv/bin/python benchmarks/{self.name}.py")
        return data

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Run]]:
    out = tmp_path_factory.mktemp("benchmarks")
    started = {name: Run(name, out) for name in TINY}
    try:
        yield started
    finally:
        for run in started.values():
            run.stop()


def test_prepare_data_llm(runs: dict[str, Run]) -> None:
    data = runs["prepare_data_llm"].result()
    suite = data["suite"]
    assert suite["tests"] == 4 and suite["annotated_turns"] >= 4
    # One call per annotated turn, one rephraser call per conversation, one per candidate.
    assert suite["calls_min"] == 2 * suite["annotated_turns"] + suite["tests"]
    assert [r["concurrency"] for r in data["runs"]] == [1, 4]
    for run in data["runs"]:
        assert run["calls"] == run["distinct_prompts"] == suite["calls_min"], run
        assert run["tests_annotated"] == 4 and run["script_errors"] == 0
        assert run["rephrasings_kept"] == suite["annotated_turns"]
        assert run["bound_s"] == max(run["bound_calls_s"], run["bound_chain_s"]) > 0
        assert run["wall_s"] >= run["bound_s"] * 0.99 and run["ratio"] >= 0.99, run  # a bound is a bound
    assert data["runs"][1]["bound_calls_s"] == pytest.approx(data["runs"][0]["bound_calls_s"] / 4, rel=0.01)
    cached = data["cached"]
    assert cached["calls"] == 0 and cached["cache_hits"] >= suite["calls_min"]
    assert cached["data_points"] == data["runs"][-1]["data_points"] > 0


def test_train_throughput(runs: dict[str, Run]) -> None:
    data = runs["train_throughput"].result()
    assert data["data"]["examples"] > 0 and data["data"]["tokens_min"] <= data["data"]["tokens_max"]
    by_side = {r["variant"]: r for r in data["runs"]}
    assert set(by_side) == {"ftrecipe", "naive"}
    ours, naive = by_side["ftrecipe"], by_side["naive"]
    assert ours["steps"] == naive["steps"] > 0
    assert ours["real_tokens"] == pytest.approx(naive["real_tokens"], rel=0.01)  # the same examples
    for run in (ours, naive):
        assert 0 <= run["padding_share"] < 1 and run["real_tokens_per_s"] > 0 and run["train_s"] > 0
        assert run["peak_rss_mib"] > 100  # torch alone is more than that
    assert 0 < ours["loss_tokens"] < ours["real_tokens"]  # completion only
    assert naive["loss_tokens"] == naive["real_tokens"]  # every token
    assert data["speedup_non_padding_tokens_per_s"] == pytest.approx(
        data["best"]["ftrecipe"]["real_tokens_per_s"] / data["best"]["naive"]["real_tokens_per_s"], rel=0.01
    )
    for row in data["padding_share_by_batch_size"]:
        assert 0 <= row["length_grouped"] < 1 and 0 <= row["random_order"] < 1


def test_operator_scale(runs: dict[str, Run]) -> None:
    data = runs["operator_scale"].result()
    (run,) = data["runs"]
    assert run["recipes"] == 3 and run["evaluation"] is True and run["operator_errors"] == []
    milestones = list(run["milestones_s"].values())
    assert milestones == sorted(milestones) and len(milestones) == 4
    assert 0 < run["data_jobs_s"] <= run["lifecycle_s"]
    kinds = run["requests_by_kind"]
    assert kinds["CREATE jobs"] == 3 * 3  # data, train, evaluate per recipe; none twice
    assert sum(kinds.values()) == run["requests_total"] > 0
    # PreparingData, Training, Evaluating, Succeeded at least; each is one status patch or more.
    assert run["status_patches_per_recipe"] >= 4
    # An Event per phase change, none about handlers; nothing written to a recipe but its status.
    assert run["events_by_reason"] == {"PreparingData": 3, "Training": 3, "Evaluating": 3, "Succeeded": 3}
    assert run["recipe_patches_by_change"] == {}
    assert len(run["load_average_start"]) == len(run["load_average_end"]) == 3
    assert run["rss_peak_mib"] >= run["rss_idle_mib"] > 0
    assert run["operator_cpu_s"] > 0


def test_train_gpu(runs: dict[str, Run]) -> None:
    """On this CPU: the tiny shape, float32 and SDPA, no GPU memory; on a GPU the same fields hold figures."""
    data = runs["train_gpu"].result()
    assert data["params"]["shape"] == "tiny" and data["params"]["examples"] > 0
    assert "torch" in data["machine"] and "bitsandbytes" in data["machine"]
    by_variant = {r["variant"]: r for r in data["runs"]}
    assert set(by_variant) == {"lora", "lora-gc"}
    for run in by_variant.values():
        assert run["state"] == "ok", run
        assert (run["dtype"], run["attention"], run["mixed_precision"]) == ("float32", "sdpa", None)
        assert run["steps"] > 0 and run["tokens_per_s"] > 0 and run["process_wall_s"] > 0
        assert run["gpu_peak_gb"] is None
