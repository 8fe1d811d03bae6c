"""Entry points of the demo models' recipes (edgert/recipes/); their outputs go to models/out/."""
