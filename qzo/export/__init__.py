"""A trained run written for other clients: PEFT adapters, merged checkpoints and GGUF
(:mod:`.formats`, :mod:`.gguf`), from merged tensors (:mod:`.merge`)."""
