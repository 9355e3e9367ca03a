import sys
import time

STARTED = time.time()  # before the imports, which are part of a stage's time

from .run import main  # noqa: E402

sys.exit(main(started=STARTED))
