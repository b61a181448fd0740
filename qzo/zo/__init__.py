"""The optimizer core: ``ZO.step`` (:mod:`.optim`), trainable values (:mod:`.params`), strategies that
choose directions (:mod:`.strategies`), update rules (:mod:`.rules`), step normalization, lr schedules and
the torch.distributed scalar exchange. Knows no model, data, loop or run directory: it sees a
:class:`~qzo.zo.params.ParamSet` and a loss closure."""
