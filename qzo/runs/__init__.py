"""The run directory, its one home: writing (:mod:`.writer`), reading back (:mod:`.reader`), checkpoints
(:mod:`.checkpoint`), the single-writer lock (:mod:`.lock`), metrics and trackers (:mod:`.metrics`) and
the step log's replay (:mod:`.replay`). Nothing here imports the training loop."""
