#!/usr/bin/env bash
# The README's demo: the example recipe (examples/moneybank/recipe.yaml) end to end on this machine,
# offline: prepare data from the MoneyBank assistant's E2E tests, train a LoRA adapter on an offline tiny
# Llama, evaluate it on held-out conversations: turn by turn (command accuracy) and whole conversations with
# the adapter in the loop (E2E pass rate). Everything lands under output/demo/
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
OUT=output/demo
RECIPE=examples/moneybank/recipe.yaml
WORK="$OUT/run"
mkdir -p "$OUT"
rm -rf "$OUT/adapter" "$OUT/data" "$OUT/small-data" "$OUT/work"  # what earlier versions of the demo left

echo "== 1. The recipe, checked offline against the API (the same rules as the CRD)"
"$BIN/ftrecipe" validate "$RECIPE" examples/recipes/*.yaml

echo
echo "== 2. A broken recipe gets one clear line, not a traceback"
# Rephrasings asked for, but no LLM named to check them (config.yml, which names it, taken out). The copy
# lives in $OUT, where its relative paths lead nowhere: the API rejects it before any path is read.
sed -e 's/numRephrases: 0 /numRephrases: 3 /' -e '/^    config: /d' -e '/^    endpoints: /d' \
  "$RECIPE" > "$OUT/broken-recipe.yaml"
"$BIN/ftrecipe" run "$OUT/broken-recipe.yaml" --dry-run || true

echo
echo "== 3. The base model: an offline tiny Llama (random weights, real tokenizer and chat template)"
test -f "$OUT/tiny-model/config.json" || "$BIN/ftrecipe" make-tiny-model "$OUT/tiny-model" --overwrite
ls "$OUT/tiny-model"

echo
echo "== 4. The plan, with the commands the cluster's Jobs would run"
"$BIN/ftrecipe" run "$RECIPE" --workdir "$WORK" --from-phase data --dry-run

echo
echo "== 5. ftrecipe run: prepare data, train, evaluate (--from-phase data: even if an earlier demo did)"
"$BIN/ftrecipe" run "$RECIPE" --workdir "$WORK" --from-phase data

echo
echo "== 6. The same command again: every phase's output exists, so every phase is reused"
start=$(date +%s%N)
"$BIN/ftrecipe" run "$RECIPE" --workdir "$WORK" | grep -E 'cached|^result'
echo "($(( ($(date +%s%N) - start) / 1000000 )) ms)"

echo
echo "== 7. The status, as the operator would write it on the FinetuneRecipe ($WORK/status.yaml)"
"$BIN/python" - "$WORK/status.yaml" <<'PY'
import sys

import yaml

status = yaml.safe_load(open(sys.argv[1], encoding="utf-8"))
print(f"phase: {status['phase']}, message: {status['message']}")
for condition in status["conditions"]:
    print(f"  {condition['type']:<13}{condition['status']:<6}{condition['reason']}: {condition['message']}")
evaluation = status.get("evaluation") or {}
figures = [f"command accuracy {evaluation['commandAccuracy']:.1%}"] if "commandAccuracy" in evaluation else []
if "e2ePassRate" in evaluation:
    figures.append(
        f"E2E pass rate {evaluation['e2ePassRate']:.1%} "
        f"({evaluation.get('e2ePassed')} of {evaluation.get('e2eTests')} held-out tests)"
    )
print("evaluation: " + (", ".join(figures) or "no figures"))
PY

echo
echo "== 8. The evaluation report: command accuracy (turn by turn, the teacher's state in every prompt) beside"
echo "      the E2E pass rate (whole held-out tests, the adapter's own commands driving them)"
"$BIN/python" - "$WORK/status.yaml" <<'PY'
import sys
from pathlib import Path

import yaml

status = yaml.safe_load(open(sys.argv[1], encoding="utf-8"))
report = Path(status["evaluation"]["reportURI"]) / "eval.md"
lines = report.read_text(encoding="utf-8").splitlines()
end = next((i for i, line in enumerate(lines) if line.startswith("## Per command type")), len(lines))
shown = lines[:end]
table = [i for i, line in enumerate(shown) if line.startswith("| test | turn |")]
if table:  # the failing tests: the first three rows are enough to see what the adapter does
    shown = shown[: table[0] + 5] + ([f"… ({report} has them all)"] if len(shown) > table[0] + 5 else [])
print("\n".join(shown).rstrip())
PY
