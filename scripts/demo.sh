#!/usr/bin/env bash
# The README's demo: runs the furthest stage of the recipe that exists so far.
# Today: validate the example recipes against the API and build the offline tiny model the
# laptop recipe trains. It grows into `ftrecipe run examples/<assistant>/recipe.yaml`.
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
"$BIN/ftrecipe" crd | grep -E '^\s+(kind|plural|shortNames):|^\s+- ftr$' || true

echo
echo "== 4. An offline tiny Llama for laptop runs (no hub download)"
"$BIN/ftrecipe" make-tiny-model "$OUT/tiny-model" --overwrite 2>/dev/null
ls "$OUT/tiny-model"
