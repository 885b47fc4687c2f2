"""The FinetuneRecipe API: typed models (the source of truth), the generated CRD, and recipe loading."""

from ftrecipe.api.load import RecipeError, load_recipe, parse_recipe
from ftrecipe.api.v1alpha1 import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    FinetuneRecipe,
    FinetuneRecipeSpec,
)

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "PLURAL",
    "VERSION",
    "FinetuneRecipe",
    "FinetuneRecipeSpec",
    "RecipeError",
    "load_recipe",
    "parse_recipe",
]
