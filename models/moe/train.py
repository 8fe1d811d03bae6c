"""Entry point kept for `python -m models.moe.train`: the recipe ships in the package,
edgert/recipes/moe.py (`python -m edgert.recipes.moe`)."""
from edgert.recipes.moe import main

if __name__ == "__main__":
    main()
