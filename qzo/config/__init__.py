"""A run's configuration: its schema and validation (:mod:`.schema`) and the builders that turn a config
into a model, trainables and an optimizer (:mod:`.build`). Shared by ``train/``, ``runs/``, ``export/`` and
``cli/``, so a run can be read back without importing the training loop."""
