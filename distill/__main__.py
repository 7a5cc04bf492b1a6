"""``python -m distill recipe=<name> [overrides]``: runs a recipe's pipeline (see distill.cli)."""

from distill.cli import main

if __name__ == "__main__":
    main()
