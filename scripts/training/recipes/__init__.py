"""The model families a run can train, by `model_type`: one module each, exposing its RECIPE."""

from . import llada2_moe, qwen3_moe
from .recipe import Recipe

RECIPES: dict[str, Recipe] = {"qwen3_moe": qwen3_moe.RECIPE, "llada2_moe": llada2_moe.RECIPE}
