"""Getting a base model into memory: loading and quantizing (:mod:`.load`), every touch of bitsandbytes'
internals (:mod:`.bnb`), layer streaming from host RAM (:mod:`.streaming`) and the host-side embedding
(:mod:`.host_embedding`)."""
