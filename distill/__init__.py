"""distill: LLaVA-MoD-style knowledge distillation of vision-language models.

Run a recipe with ``python -m distill recipe=<name> [hydra overrides]`` (or the ``distill`` console script).
"""

__version__ = "0.1.0"
