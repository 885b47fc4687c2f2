"""Training side of ftrecipe: needs the ``train`` extra (torch, transformers, peft, trl)."""
