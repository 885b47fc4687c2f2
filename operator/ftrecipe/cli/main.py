"""`ftrecipe` entry point: parse arguments, call the library, turn known errors into one line and an exit code."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ftrecipe import __version__
from ftrecipe.api import RecipeError, load_recipe
from ftrecipe.api.crd import render_crd_yaml

EXIT_USER_ERROR = 2


def _cmd_crd(args: argparse.Namespace) -> int:
    text = render_crd_yaml()
    if args.out is None:
        sys.stdout.write(text)
        return 0
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)  # atomic: a crash never leaves a half-written CRD
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    failed = False
    for name in args.files:
        try:
            recipe = load_recipe(Path(name))
        except RecipeError as error:
            failed = True
            for line in error.lines:
                print(line, file=sys.stderr)
            continue
        spec = recipe.spec
        print(
            f"{name}: valid {recipe.kind} {recipe.metadata.name or '(unnamed)'}: "
            f"annotator {spec.data_preparation.annotator}, syntax {spec.command_generator.syntax}, "
            f"{spec.training.method} r={spec.training.lora.r}, {spec.training.hyperparameters.epochs} epoch(s)"
        )
    return EXIT_USER_ERROR if failed else 0


def _cmd_make_tiny_model(args: argparse.Namespace) -> int:
    # Imported here: torch and transformers are the `train` extra and slow to import.
    from ftrecipe.training.tiny_model import build_tiny_model

    try:
        path = build_tiny_model(Path(args.dir), seed=args.seed, overwrite=args.overwrite)
    except FileExistsError:
        print(f"{args.dir}: already exists and is not empty; pass --overwrite to replace it", file=sys.stderr)
        return EXIT_USER_ERROR
    print(f"{path}: tiny random Llama with tokenizer and chat template (for demos and tests)")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ftrecipe",
        description="Fine-tune a Rasa CALM command generator, on Kubernetes or on one machine.",
    )
    parser.add_argument("--version", action="version", version=f"ftrecipe {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    crd = commands.add_parser("crd", help="print the FinetuneRecipe CRD generated from the API models")
    crd.add_argument("--out", help="write to this file instead of standard output")
    crd.set_defaults(run=_cmd_crd)

    validate = commands.add_parser("validate", help="check FinetuneRecipe manifests offline")
    validate.add_argument("files", nargs="+", metavar="FILE", help="recipe YAML files")
    validate.set_defaults(run=_cmd_validate)

    tiny = commands.add_parser(
        "make-tiny-model", help="build a tiny random Llama and tokenizer offline (for the demo and tests)"
    )
    tiny.add_argument("dir", help="output folder")
    tiny.add_argument("--seed", type=int, default=0, help="weights seed (same seed, same files)")
    tiny.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    tiny.set_defaults(run=_cmd_make_tiny_model)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
