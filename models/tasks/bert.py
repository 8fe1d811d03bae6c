"""Entry point kept for `python -m models.tasks.bert`: the recipe ships in the package,
edgert/recipes/bert.py (`python -m edgert.recipes.bert`)."""
from edgert.recipes.bert import main

if __name__ == "__main__":
    main()
