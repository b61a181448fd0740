"""A chat template that loops without end stops with an error naming it (issue 32), in ``qzo train`` and off the
main thread, and the bound leaves a caller's own timer as it was.

The looping cases run in a subprocess with a timeout, so a regression fails instead of hanging the suite; they
lower ``RENDER_SECONDS`` (the bound's setting, not the code under test) to keep the suite fast.
"""

import signal
import subprocess
import sys

LOOP = ("{%- for i in range(100000) %}{%- for j in range(100000) %}{%- endfor %}{%- endfor %}"
        "{%- for message in messages %}{{ message['content'] }}{%- endfor %}")

TRAIN = """
import sys
import qzo.data.templates as templates
from qzo.errors import DataError
from qzo.train.loop import train
templates.RENDER_SECONDS = 1.0
try:
    train(None, sys.argv[1:], progress=False, log=lambda *_: None)
except DataError as exc:
    print("error:", exc, flush=True)
"""


def test_a_template_that_never_ends_stops_qzo_train_naming_it(tiny_model_dir, code_chats, tmp_path):
    from helpers import run_overrides

    template = tmp_path / "loops.jinja"
    template.write_text(LOOP)
    sets = run_overrides(tiny_model_dir, code_chats, tmp_path / "run", **{"data.chat_template": template})
    done = subprocess.run([sys.executable, "-c", TRAIN, *sets], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"the chat template {str(template)!r} (data.chat_template) was stopped after 1 s on one chat" in done.stdout
    assert "set data.chat_template to a built-in" in done.stdout
    assert not (tmp_path / "run").exists()  # stopped while reading the data, before the run folder


THREAD = """
import sys, threading
import qzo.data.templates as templates
from transformers import AutoTokenizer
from qzo.errors import DataError
templates.RENDER_SECONDS = 0.5
tok = AutoTokenizer.from_pretrained(sys.argv[1])
tok.chat_template = sys.argv[2]
said = []
def render():
    try:
        templates.render(tok, [{"role": "user", "content": "hi"}], False, where="worker")
    except DataError as exc:
        said.append(str(exc))
worker = threading.Thread(target=render)
worker.start()
worker.join()
print(said[0], flush=True)
"""


def test_the_bound_holds_off_the_main_thread_too():
    from helpers import TINY_TOKENIZER

    done = subprocess.run([sys.executable, "-c", THREAD, str(TINY_TOKENIZER), LOOP], capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("worker: the tokenizer's own chat template was stopped after 0.5 s")


def test_a_normal_render_leaves_a_callers_timer_running(tiny_tokenizer):
    from qzo.data.templates import render

    fired = []
    before = signal.signal(signal.SIGALRM, lambda *_: fired.append(True))
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        text = render(tiny_tokenizer, [{"role": "user", "content": "hi"}], True)
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert "hi" in text and 25.0 < left <= 30.0  # still armed, less the time the render took
        assert signal.getsignal(signal.SIGALRM) is not None and not fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)


def test_a_template_file_of_megabytes_is_refused_before_it_is_read(tiny_tokenizer, tmp_path):
    import pytest

    from qzo.data.templates import set_chat_template
    from qzo.errors import DataError

    big = tmp_path / "big.jinja"
    big.write_text("{{ messages }}" + " " * (2 << 20))
    with pytest.raises(DataError, match=r"is 2.0 MiB, over the 1 MiB a chat template may be"):
        set_chat_template(tiny_tokenizer, str(big))
