"""Entry point kept for `python -m models.tasks.build`: the recipe ships in the package,
edgert/recipes/tasks.py (`python -m edgert.recipes.tasks`)."""
from edgert.recipes.tasks import main

if __name__ == "__main__":
    main()
