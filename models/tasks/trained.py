"""Entry point kept for `python -m models.tasks.trained`: the recipe ships in the package,
edgert/recipes/trained.py (`python -m edgert.recipes.trained`)."""
from edgert.recipes.trained import main

if __name__ == "__main__":
    main()
