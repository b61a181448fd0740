"""The training loop (:mod:`.loop`: setup -> train -> save), its divergence guard (:mod:`.guard`), stop
signals (:mod:`.stop_signals`) and the memory planner (:mod:`.plan`). Knows no terminal and no plot."""
