"""The compiled noise generator is loaded only when it can be trusted (issue 32): a library swapped into the cache
is never loaded (its SHA-256 no longer matches the one recorded when qzo built it), and a cache folder others may
write, or another user owns, is refused with a message naming the fix.

The swapped-in library is a real one with a constructor that writes a file when it is loaded, so "not loaded" is
seen, not inferred. Each case runs in a fresh interpreter (a process loads a library once).
"""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

CC = shutil.which(os.environ.get("CC") or "cc") or shutil.which("gcc")
pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler: the compiled noise generator cannot be built")

EVIL = textwrap.dedent("""
    #include <stdio.h>
    #include <stdint.h>
    __attribute__((constructor)) static void planted(void) {
        FILE *f = fopen(PLANTED_MARK, "w");
        if (f) { fputs("loaded", f); fclose(f); }
    }
    void qzo_philox_uniforms(uint64_t key, uint64_t offset, int64_t n, float *u1, float *theta) {
        for (int64_t i = 0; i < n; i++) { u1[i] = 0.5f; theta[i] = 0.5f; }
    }
""")

CHECK = """
import torch
from qzo.noise import contract, native
print("available", native.available(), flush=True)
assert torch.equal(contract.randn(3, 4, 1001), contract.randn_reference(3, 4, 1001))
"""


def _python(cache, code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "QZO_CACHE": str(cache), **env})


@pytest.fixture
def built(tmp_path):
    """A cache with the generator built by qzo: ``(cache, library path)``."""
    cache = tmp_path / "cache"
    done = _python(cache, CHECK)
    assert done.returncode == 0 and "available True" in done.stdout, done.stderr
    (lib,) = (cache / "native").glob("noise_philox-*.so")
    return cache, lib


def _plant(lib, mark):
    """Replace ``lib`` by a library that writes ``mark`` when loaded (and returns wrong noise)."""
    source = lib.parent.parent / "evil.c"
    source.write_text(EVIL.replace("PLANTED_MARK", f'"{mark}"'))
    subprocess.run([CC, "-shared", "-fPIC", str(source), "-o", str(lib)], check=True, capture_output=True)


def test_a_library_swapped_into_the_cache_is_never_loaded(built, tmp_path):
    cache, lib = built
    mark = tmp_path / "loaded.txt"
    _plant(lib, mark)
    done = _python(cache, CHECK)
    assert done.returncode == 0, done.stderr  # the noise is the contract's, not the planted library's
    assert "available True" in done.stdout  # rebuilt from qzo's source and loaded after its check
    assert not mark.exists(), "the planted library was loaded"


@pytest.mark.parametrize("what", ["root", "native"])
def test_a_cache_folder_others_may_write_is_refused(built, tmp_path, what):
    cache, lib = built
    folder = cache if what == "root" else cache / "native"
    mark = tmp_path / "loaded.txt"
    _plant(lib, mark)
    os.chmod(folder, 0o777)
    done = _python(cache, CHECK)
    assert done.returncode == 0, done.stderr  # auto: the reference, said once
    assert "available False" in done.stdout and not mark.exists()
    assert f"qzo's cache '{folder}' is writable by its group and others (mode 777)" in done.stderr
    assert f"chmod go-w {folder}" in done.stderr
    strict = _python(cache, CHECK, QZO_CPU_NOISE="native")
    assert strict.returncode != 0 and "cannot be loaded" in strict.stderr and not mark.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder to another user needs root")
def test_a_cache_folder_another_user_owns_is_refused(built, tmp_path):
    cache, _ = built
    os.chown(cache / "native", 4321, -1)
    done = _python(cache, CHECK)
    assert "available False" in done.stdout
    assert "belongs to another user (uid 4321)" in done.stderr and "set QZO_CACHE" in done.stderr
