import sys
import time

STARTED = time.time()  # before the imports, which are part of a stage's time

from .warm import run as run_warm  # noqa: E402  (stdlib only)

code = run_warm("cmt_bench", sys.argv[1:], STARTED)  # in `cmt-bench repro`'s warm interpreter, if there is one
if code is None:
    from .cli import main  # noqa: E402
    code = main(started=STARTED)
sys.exit(code)
