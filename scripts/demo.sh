#!/usr/bin/env bash
# The README's demo: runs the furthest stage of the recipe that exists so far.
# Today: validate the example recipes, prepare data from the example assistant's E2E tests offline,
# build the offline tiny model and train a LoRA adapter on it (CPU, a few seconds).
# It grows into `ftrecipe run examples/moneybank/recipe.yaml`.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
OUT=output/demo
mkdir -p "$OUT"

echo "== 1. The FinetuneRecipe API: example recipes checked offline (same rules as the CRD)"
"$BIN/ftrecipe" validate examples/recipes/*.yaml

echo
echo "== 2. A broken recipe gets one clear line, not a traceback"
sed 's/r: 16 /r: 0  /' examples/recipes/full.yaml > "$OUT/broken-recipe.yaml"
"$BIN/ftrecipe" validate "$OUT/broken-recipe.yaml" || true

echo
echo "== 3. The CRD generated from the models (what 'kubectl apply -f crds/' installs)"
"$BIN/ftrecipe" crd | grep -E '^\s+(kind: FinetuneRecipe|plural:|shortNames:)|^\s+- ftr$' || true

echo
echo "== 4. prepare-data on the example assistant, offline (labels from the tests' assertions)"
"$BIN/ftrecipe" prepare-data examples/moneybank/e2e_tests examples/moneybank/e2e_tests_legacy \
    --assistant examples/moneybank --annotator assertions --num-rephrases 0 --out "$OUT/data" 2>&1 | grep -v ': ok$'
echo "-- $OUT/data/result_summary.yaml"
cat "$OUT/data/result_summary.yaml"
echo "-- first conversation of $OUT/data/1_command_annotations/transfers.yml"
sed -n '2,14p' "$OUT/data/1_command_annotations/transfers.yml"

echo
echo "== 5. An offline tiny Llama for laptop runs (no hub download)"
"$BIN/ftrecipe" make-tiny-model "$OUT/tiny-model" --overwrite 2>/dev/null
ls "$OUT/tiny-model"

echo
echo "== 6. Train a LoRA adapter on prepared data (two test files, to stay fast on a laptop CPU)"
"$BIN/ftrecipe" prepare-data examples/moneybank/e2e_tests/accounts.yml examples/moneybank/e2e_tests/payments/payees.yml \
    --assistant examples/moneybank --annotator assertions --num-rephrases 0 --out "$OUT/small-data" >/dev/null 2>&1
rm -rf "$OUT/work"
"$BIN/ftrecipe" train --data "$OUT/small-data" --base-model "$OUT/tiny-model" --out "$OUT/adapter" \
    --work-dir "$OUT/work" --set hyperparameters.epochs=4 --set hyperparameters.learningRate=0.01 \
    --set hyperparameters.batchSize=4 --set hyperparameters.gradientAccumulationSteps=1 \
    --set hyperparameters.warmupSteps=0 --set hyperparameters.gradientCheckpointing=false --set gpus=0 \
    2>/dev/null | grep -v '"event": "progress"' || true
echo "-- validation loss per evaluation:"
python3 -c "import json,sys; print([round(json.loads(l)['eval_loss'], 3) for l in open(sys.argv[1]) if json.loads(l)['eval_loss'] is not None])" "$OUT/adapter/metrics.jsonl"
echo "-- the adapter bundle ($OUT/adapter):"
ls "$OUT/adapter"
