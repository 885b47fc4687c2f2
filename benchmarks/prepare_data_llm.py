"""How close prepare-data gets to the LLM-bound lower bound.

Runs the example assistant's suite against the local OpenAI-compatible test server with a fixed latency
per request, and compares wall time with two lower bounds: calls × latency / concurrency (the client's
concurrency cap), and the longest chain of calls that must run in order (a conversation's turns are
labelled one after another; its rephrasings after its annotation). No cache: every call is made.

    .venv/bin/python benchmarks/prepare_data_llm.py [--latency 0.2] [--concurrency 16] [--rephrases 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from ftrecipe.dataprep.pipeline import PrepareDataOptions, prepare_data  # noqa: E402
from support.llm_server import ChatRequest, LLMServer  # noqa: E402
from support.moneybank import EXAMPLE, TESTS, annotated_messages, oracle_answers  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rephrases", type=int, default=2)
    args = parser.parse_args()
    answers, messages = oracle_answers(), annotated_messages()
    suffix = re.compile(r" \(reworded \d\)")

    def script(request: ChatRequest) -> str:
        name = re.search(r'conversations, "([^"]+)"', request.prompt)
        if request.prompt.startswith("You help build training data") and name:
            return "\n\n".join(
                f"USER: {m}\n" + "\n".join(f"{i}. {m} (reworded {i})" for i in range(1, args.rephrases + 1))
                for m in messages[name.group(1)]
            )
        return answers[suffix.sub("", request.prompt)]

    with LLMServer() as server, tempfile.TemporaryDirectory() as tmp:
        server.script(script)
        server.latency = args.latency
        os.environ["OPENAI_API_KEY"] = server.api_key or ""
        llm = Path(tmp) / "llm.yml"
        llm.write_text(f"syntax: v2\nllm: {{provider: self-hosted, model: m, api_base: {server.base_url}}}\n")
        options = PrepareDataOptions(
            e2e_paths=(TESTS,),
            assistant=EXAMPLE,
            llm_config=llm,
            out=Path(tmp) / "out",
            cache_dir=Path(tmp) / "cache",
            concurrency=args.concurrency,
            num_rephrases=args.rephrases,
        )
        started = time.monotonic()
        asyncio.run(prepare_data(options))
        wall = time.monotonic() - started
        calls = len(server.chat_requests)
    turns = [len(m) for m in messages.values()]
    # In order per conversation: its turns, its rephraser call, then its validations (parallel): 1 more.
    chain = max(turns) + (2 if args.rephrases else 0)
    bound_concurrency = calls * args.latency / args.concurrency
    bound = max(bound_concurrency, chain * args.latency)
    print(f"tests {len(turns)}, annotated turns {sum(turns)}, LLM calls {calls}")
    print(f"latency {args.latency:.3f} s, concurrency {args.concurrency}, rephrasings {args.rephrases}")
    print(f"lower bound calls x latency / concurrency: {bound_concurrency:.2f} s")
    print(f"lower bound longest in-order chain ({chain} calls): {chain * args.latency:.2f} s")
    ratio = f" = {wall / bound:.2f} x the larger bound" if bound else ""
    print(f"wall time {wall:.2f} s{ratio}")


if __name__ == "__main__":
    main()
