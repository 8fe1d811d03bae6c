"""A BERT-class sentence encoder from random weights, as ONNX: the steady-state check of
`edgert bench switch` on a graph of many small ops (the demo ViT has few, large ones).

    python -m edgert.recipes.bert --out models/out/bert [--tokens 16]

MiniLM-L6's shape (6 layers, hidden 384, 12 heads, FFN 1536, 30522-word vocabulary, 22.7M
parameters), built with transformers' BertModel (seed 0) and exported with torch's
TorchScript exporter. Needs torch and transformers (`pip install edgert[test]`); nothing is
downloaded.
"""
from __future__ import annotations

import argparse
import os


def build(out_dir: str, tokens: int = 16) -> str:
    """Write out_dir/bert.onnx (input ``input_ids`` int64 [1, tokens]) unless it exists."""
    path = os.path.join(out_dir, "bert.onnx")
    if os.path.exists(path):
        return path
    import torch
    from transformers import BertConfig, BertModel
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                     num_attention_heads=12, intermediate_size=1536,
                     attn_implementation="eager")
    model = _LastHidden(BertModel(cfg).eval())
    ids = torch.randint(0, cfg.vocab_size, (1, tokens))
    tmp = path + ".tmp"
    torch.onnx.export(model, (ids,), tmp, input_names=["input_ids"], output_names=["hidden"],
                      dynamo=False, opset_version=17)
    os.replace(tmp, path)
    return path


class _LastHidden:
    """BertModel with one tensor in and one out (what the exporter traces)."""

    def __new__(cls, bert):
        import torch

        class Wrapped(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.bert = bert

            def forward(self, ids):
                return self.bert(input_ids=ids).last_hidden_state
        return Wrapped()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="models/out/bert")
    ap.add_argument("--tokens", type=int, default=16)
    args = ap.parse_args(argv)
    print(f"wrote {build(args.out, args.tokens)}")


if __name__ == "__main__":
    main()
