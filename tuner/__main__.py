import os
import sys

from .cli import main

code = main()
if "ray" in sys.modules:
    sys.exit(code)  # Ray's own exit handlers end what this process started
# Everything is written by now (trials committed, tables replaced atomically, workers ended):
# skip the interpreter's teardown of torch and its libraries, a second of the user's wait.
sys.stdout.flush()
sys.stderr.flush()
os._exit(code or 0)
