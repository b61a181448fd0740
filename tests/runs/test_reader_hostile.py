"""A run's config.yaml read back (``qzo.runs.reader``): a malformed or planted file is a one-line error."""

import pytest

from qzo.errors import ConfigError, QzoError
from qzo.runs.reader import load_run_config


@pytest.mark.parametrize("text,match", [
    ("- a\n- b\n", "must be a mapping of sections, not list"),
    ("model: [\n", "not valid YAML"),
    ("a: &a [1, 2]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
     "d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: [*d, *d, *d, *d, *d, *d, *d, *d, *d]\n", "aliases"),
])
def test_a_malformed_run_config_is_one_line(tmp_path, text, match):
    (tmp_path / "config.yaml").write_text(text)
    (tmp_path / "steps.jsonl").touch()
    with pytest.raises(ConfigError, match=match) as exc:
        load_run_config(tmp_path)
    assert "\n" not in str(exc.value) and len(str(exc.value)) < 400


def test_a_run_config_that_links_elsewhere_is_refused(tmp_path):
    (tmp_path / "elsewhere.yaml").write_text("train: {steps: 3}\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").symlink_to(tmp_path / "elsewhere.yaml")
    (run / "steps.jsonl").touch()
    with pytest.raises(QzoError, match="is a symbolic link"):
        load_run_config(run)
