"""Records to batches to a loss: reading sources (:mod:`.sources`), record layouts (:mod:`.formats`), chat
templates (:mod:`.templates`), tokenized and packed datasets (:mod:`.dataset`), the causal-LM loss
(:mod:`.loss`) and other objectives (:mod:`.objectives`). The demo's chats are in ``assets/``."""
