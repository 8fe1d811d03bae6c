"""Demo task models: one small-ViT backbone and sparse fine-tuned task variants."""
