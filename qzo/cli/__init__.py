"""What a user runs: ``qzo train|chat|eval|plot|plan|export|cache|recipes`` (:mod:`.main`), and the only place
that prints for a user. Everything here is a thin shell over the packages below it."""
