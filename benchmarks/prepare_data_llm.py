"""How close prepare-data gets to the LLM-bound lower bound, at several concurrencies, and with the cache.

Generates an assistant from the MoneyBank example with `--tests` E2E tests (`moneybank_suite`), serves a
perfect command generator for it from a local OpenAI-compatible server in a child process that answers
every request after `--latency` seconds, and runs `prepare-data` (in this process, the real pipeline) once
per `--concurrency` value with an empty cache (after a warm-up run without the LLM), then once more at the last concurrency with the cache the
run before it filled.

Per run: wall time; LLM calls the server received vs the minimum (one per annotated turn, one rephraser
call per conversation, one per rephrasing candidate); the lower bound max(longest conversation's chain ×
latency, minimum calls × latency / concurrency), where the chain is a conversation's turns in order, then
its rephraser call, then its validations (in parallel: one more); wall / bound; CPU seconds of this
process (the client side's own work).

    .venv/bin/python benchmarks/prepare_data_llm.py [--tests 210] [--latency 0.2] [--rephrases 1]
        [--concurrency 1 4 16 64] [--json output/benchmarks/prepare_data_llm.json]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import OUTPUT, machine, table, write_json
from moneybank_suite import OracleServer, Suite, annotated_messages, generate_assistant

from ftrecipe.dataprep.pipeline import PrepareDataOptions, prepare_data


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tests", type=int, default=210, help="E2E tests in the generated assistant")
    parser.add_argument("--latency", type=float, default=0.2, help="seconds per LLM request")
    parser.add_argument("--rephrases", type=int, default=1, help="rephrasings per user message")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--json", type=Path, default=OUTPUT / "prepare_data_llm.json")
    return parser.parse_args(argv)


def run_once(
    suite: Suite, server: OracleServer, work: Path, *, concurrency: int, rephrases: int, cache: Path
) -> dict[str, Any]:
    llm = work / "llm.yml"
    llm.write_text(f"syntax: v2\nllm: {{provider: self-hosted, model: m, api_base: {server.base_url}}}\n")
    out = work / f"out-c{concurrency}-{len(list(work.glob('out-*')))}"
    options = PrepareDataOptions(
        e2e_paths=(suite.tests,),
        assistant=suite.assistant,
        llm_config=llm,
        out=out,
        cache_dir=cache,
        concurrency=concurrency,
        num_rephrases=rephrases,
    )
    server.reset()
    cpu = time.process_time()
    started = time.monotonic()
    result = asyncio.run(prepare_data(options))
    wall = time.monotonic() - started
    cpu = time.process_time() - cpu
    counts = server.counts()
    summary = result.summary
    usage = summary["llm_usage"]["purposes"]
    return {
        "concurrency": concurrency,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "calls": counts["calls"],
        "distinct_prompts": counts["distinct_prompts"],
        "cache_hits": sum(u["cache_hits"] for u in usage.values()),
        "tests_annotated": summary["num_annotated_conversations"],
        "rephrasings_kept": summary["num_passing_rephrased_user_messages"],
        "data_points": summary["num_ft_data_points"],
        "script_errors": counts["script_errors"],
    }


def warm_up(suite: Suite, work: Path) -> None:
    """One run without the LLM (labels from the assertions, no rephrasing), so that first-use costs
    (imports, matplotlib's first figure) are not in the measured runs."""
    options = PrepareDataOptions(
        e2e_paths=(suite.tests,),
        assistant=suite.assistant,
        annotator="assertions",
        num_rephrases=0,
        out=work / "out-warm-up",
        cache_dir=work / "cache-warm-up",
    )
    asyncio.run(prepare_data(options))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("ftrecipe").setLevel(logging.WARNING)
    info = machine()
    with tempfile.TemporaryDirectory(prefix="ftrecipe-bench-") as tmp:
        work = Path(tmp)
        suite = generate_assistant(work / "assistant", args.tests)
        turns = [len(m) for m in annotated_messages(suite).values()]
        rephrasing = args.rephrases > 0
        minimum = sum(turns) + ((len(turns) + args.rephrases * sum(turns)) if rephrasing else 0)
        chain = max(turns) + (2 if rephrasing else 0)
        print(
            f"generated assistant: {suite.test_cases} tests, {sum(turns)} annotated turns, longest "
            f"conversation {max(turns)} turns; {args.rephrases} rephrasing(s) per message; latency "
            f"{args.latency:g} s; minimum LLM calls {minimum}; longest chain {chain} calls"
        )
        warm_up(suite, work)
        runs: list[dict[str, Any]] = []
        with OracleServer(suite, rephrases=args.rephrases, latency=args.latency) as server:
            os.environ["OPENAI_API_KEY"] = server.api_key
            for concurrency in args.concurrency:
                cache = work / f"cache-c{concurrency}"
                run = run_once(
                    suite, server, work, concurrency=concurrency, rephrases=args.rephrases, cache=cache
                )
                bound_calls = minimum * args.latency / concurrency
                bound = max(bound_calls, chain * args.latency)
                run |= {
                    "calls_min": minimum,
                    "bound_calls_s": round(bound_calls, 3),
                    "bound_chain_s": round(chain * args.latency, 3),
                    "bound_s": round(bound, 3),
                    "ratio": round(run["wall_s"] / bound, 3) if bound else None,
                }
                runs.append(run)
                print(f"  concurrency {concurrency}: {run['wall_s']:.2f} s, {run['calls']} calls")
            last = args.concurrency[-1]
            cached = run_once(
                suite, server, work, concurrency=last, rephrases=args.rephrases, cache=work / f"cache-c{last}"
            )
            print(f"  re-run with the cache: {cached['wall_s']:.2f} s, {cached['calls']} calls")
    print()
    print(
        table(
            [
                "concurrency",
                "LLM calls (min)",
                "bound (s)",
                "wall (s)",
                "wall / bound",
                "CPU (s)",
                "tests ok",
            ],
            [
                [
                    r["concurrency"],
                    f"{r['calls']} ({r['calls_min']})",
                    r["bound_s"],
                    r["wall_s"],
                    r["ratio"],
                    r["cpu_s"],
                    f"{r['tests_annotated']}/{suite.test_cases}",
                ]
                for r in runs
            ]
            + [
                [
                    f"{last}, cached",
                    f"{cached['calls']} ({cached['cache_hits']} cache hits)",
                    "",
                    cached["wall_s"],
                    "",
                    cached["cpu_s"],
                    f"{cached['tests_annotated']}/{suite.test_cases}",
                ]
            ],
        )
    )
    write_json(
        args.json,
        {
            "benchmark": "prepare_data_llm",
            "machine": info,
            "params": {
                "tests": args.tests,
                "latency_s": args.latency,
                "rephrases": args.rephrases,
                "concurrency": args.concurrency,
            },
            "suite": {
                "tests": suite.test_cases,
                "annotated_turns": sum(turns),
                "longest_conversation_turns": max(turns),
                "longest_chain_calls": chain,
                "calls_min": minimum,
            },
            "runs": runs,
            "cached": cached,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
