"""The benchmark scripts still run: each one, as its own command, with tiny parameters, checked by its JSON.

All five start at once (they mostly wait: on the slow LLM, on subprocesses, on the operator), so the
module takes about as long as the slowest one. The figures are not checked against targets here, only
that they are there and make sense (docs/benchmarks.md holds the measured ones).
"""

from __future__ import annotations

import json
import os
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
    "train_throughput": ["--vocab", "tiny", "--tests", "2", "--batch-size", "2", "--repeats", "1"],
    "operator_scale": ["--recipes", "3", "--timeout", "60"],
    "kube_requests": ["--requests", "20", "--repeats", "1"],
    "train_gpu": ["--shape", "tiny", "--tests", "2", "--batch-size", "2", "--variants", "lora"],
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
    assert data["params"]["gradient_checkpointing"] == "on" and data["params"]["model_vocab_size"] == 512
    by_side = {r["side"]: r for r in data["runs"]}
    assert set(by_side) == {"ftrecipe", "baseline"}
    ours, baseline = by_side["ftrecipe"], by_side["baseline"]
    assert ours["steps"] == baseline["steps"] > 0
    # The same examples and the same completion-only labels on both sides
    examples_tokens = data["data"]["tokens_mean"] * data["data"]["examples"]
    assert ours["real_tokens"] == baseline["real_tokens"] == pytest.approx(examples_tokens, rel=1e-3)
    assert 0 < ours["loss_tokens"] == baseline["loss_tokens"] < ours["real_tokens"]
    for run in (ours, baseline):
        assert 0 <= run["padding_share"] < 1 and run["real_tokens_per_s"] > 0 and run["train_s"] > 0
        assert run["memory_method"] == "VmHWM per step"
        # torch alone is more than 100 MiB; a step's peak is within the process's and above its resting RSS
        assert run["process_peak_rss_mib"] >= run["step_peak_mib"] > run["rss_at_first_step_mib"] > 100
    (comparison,) = data["comparisons"]
    assert comparison["tokens_per_s_ratio"] == pytest.approx(
        ours["real_tokens_per_s"] / baseline["real_tokens_per_s"], rel=0.01
    )
    assert comparison["step_peak_ratio"] == pytest.approx(
        baseline["step_peak_mib"] / ours["step_peak_mib"], rel=0.01
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
    # The operator's own requests share at most one kept-alive connection per worker thread (a client per
    # request opened one per request: about 42 here); kopf posts the 12 Events.
    assert run["requests_by_client"] == {"kubernetes client": run["requests_total"] - 12, "kopf": 12}
    assert 1 <= run["connections_by_client"]["kubernetes client"] <= min(32, (os.cpu_count() or 1) + 4)


def test_kube_requests(runs: dict[str, Run]) -> None:
    data = runs["kube_requests"].result()
    rows = {(row["transport"], row["side"]): row for row in data["medians"]}
    assert set(rows) == {(t, s) for t in ("HTTP", "TLS") for s in ("client per request", "shared client")}
    for transport in ("HTTP", "TLS"):
        assert rows[transport, "client per request"]["connections"] == 20
        assert rows[transport, "shared client"]["connections"] == 0
    assert all(row["cpu_ms_per_request"] > 0 and row["wall_ms_per_request"] > 0 for row in rows.values())


def test_train_gpu(runs: dict[str, Run]) -> None:
    """On this CPU: the tiny shape (Llama 3's vocabulary), LoRA, both sides; on a GPU the same fields hold
    CUDA figures (step peak from torch.cuda.max_memory_allocated)."""
    data = runs["train_gpu"].result()
    assert data["params"]["shape"] == "tiny" and data["params"]["examples"] > 0 and data["dry_run"] is False
    assert (
        "torch" in data["machine"] and "bitsandbytes" in data["machine"] and "liger_kernel" in data["machine"]
    )
    by_side = {r["side"]: r for r in data["runs"]}
    assert set(by_side) == {"baseline", "ftrecipe"}
    for run in by_side.values():
        assert run["state"] == "ok" and run["variant"] == "lora", run
        assert run["steps"] > 0 and run["real_tokens_per_s"] > 0 and run["step_peak_mib"] > 0
    assert by_side["baseline"]["loss_tokens"] == by_side["ftrecipe"]["loss_tokens"] > 0
    (comparison,) = data["comparisons"]
    assert comparison["variant"] == "lora" and comparison["step_peak_ratio"] > 0


def test_train_gpu_dry_run(tmp_path: Path) -> None:
    """The 8B plan on a machine without a GPU: every variant planned for both sides, nothing trained."""
    out = tmp_path / "dry.json"
    argv = [sys.executable, str(BENCHMARKS / "train_gpu.py"), "--shape", "llama-8b", "--tests", "2"]
    done = subprocess.run([*argv, "--dry-run", "--json", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["dry_run"] is True and data["runs"] == []
    assert [p["variant"] for p in data["plan"]] == ["lora", "qlora-4bit", "qlora-8bit"]
    for item in data["plan"]:
        assert item["sides"] == ["baseline", "ftrecipe"]
        assert "hyperparameters.gradientCheckpointing=true" in item["ftrecipe_settings"]
        estimate = item["estimated_gib_without_checkpointing"]
        # 2 x 4096 tokens of 128,256 logits in bf16 plus their float32 softmax: 9.8 GiB more for the baseline
        assert estimate["baseline"] - estimate["ftrecipe"] == pytest.approx(9.8, abs=0.1)
