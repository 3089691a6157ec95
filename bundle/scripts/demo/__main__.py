"""`make demo` runs ``python -m scripts.demo`` from ``bundle/``."""

import fire

from .run import main

fire.Fire(main)
