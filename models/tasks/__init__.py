"""Entry points: python -m models.tasks.build|trained|bert (recipes in edgert/recipes/)."""
