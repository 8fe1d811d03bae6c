"""Recipes that build the demo and benchmark models locally (nothing is downloaded): the
demo task ViTs (``tasks``), a trained task set (``trained``), a BERT-class encoder
(``bert``) and the demo MoE language model (``moe``). They ship in the package so that
`edgert demo` and `edgert bench ...` work from any install; their outputs go wherever the
caller says (by default ``models/out/...`` under the current directory), never into the
package."""
