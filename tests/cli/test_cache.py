"""``qzo cache --clear`` removes what qzo wrote in its cache and nothing else (issue 32): a user's own files in
the folder, even under the names of qzo's parts, stay."""

import os
import subprocess
import sys

import pytest

from qzo.cache import TMP_PREFIX, record

pytestmark = pytest.mark.skipif(not any(os.access(os.path.join(d, "cc"), os.X_OK)
                                        for d in os.environ.get("PATH", "").split(os.pathsep)),
                                reason="no C compiler: the compiled noise generator cannot be built")


def _qzo(cache, *args):
    env = {**os.environ, "QZO_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "qzo", *args], capture_output=True, text=True, timeout=300, env=env)


def test_clear_removes_only_what_qzo_wrote(tmp_path):
    cache = tmp_path / "cache"
    build = subprocess.run([sys.executable, "-c", "from qzo.noise import native; assert native.available()"],
                           env={**os.environ, "QZO_CACHE": str(cache)}, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    built = list((cache / "native").glob("noise_philox-*.so"))
    assert len(built) == 1 and built[0].with_name(built[0].name + ".qzo").is_file()  # its record, with its SHA-256
    # qzo's other writes: a converted model folder (recorded once published) and a killed conversion's temp folder
    converted = cache / "gguf" / "model-0123456789abcdef"
    converted.mkdir(parents=True)
    (converted / "config.json").write_text("{}")
    record(converted, source="model.gguf")
    (cache / "gguf" / f"{TMP_PREFIX}abc").mkdir()
    # the user's own files, beside them and under qzo's part names
    mine = {cache / "notes.txt": "mine\n", cache / "native" / "my-lib.so": "mine\n", cache / "data" / "x.json": "{}\n",
            cache / "gguf" / "my-notes" / "notes.txt": "mine\n", cache / "gguf" / "fake.qzo": "not a record\n"}
    for path, text in mine.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    done = _qzo(cache, "cache", "--clear")
    assert done.returncode == 0, done.stderr
    assert {p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file()} == \
        {p.relative_to(cache).as_posix() for p in mine}
    assert all(path.read_text() == text for path, text in mine.items())
    assert not built[0].exists() and not converted.exists()
    assert "kept 5 path(s) there that qzo did not write" in done.stdout


def test_clear_of_a_cache_holding_only_qzos_files_removes_the_folder(tmp_path):
    cache = tmp_path / "cache"
    entry = cache / "gguf" / "m-0000000000000000"
    entry.mkdir(parents=True)
    (entry / "config.json").write_text("{}")
    record(entry)
    done = _qzo(cache, "cache", "--clear")
    assert done.returncode == 0, done.stderr
    assert not cache.exists() and "kept" not in done.stdout
