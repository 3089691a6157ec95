"""What the workflow configs call, loaded at once: the configs reach the package as ``@scripts``.

MONAI puts the bundle root on ``sys.path`` only when a run starts, after the configs have been
parsed and their ``imports`` evaluated, so ``$import scripts`` fails outside the bundle folder.
Each config instead adds ``bundle_root`` itself and takes ``scripts`` from here (its ``scripts``
id): the package, with every module below loaded as its attributes. Loading it also makes a
failed command-line run end with the bundle's own message (``scripts.common.errors``)."""

import scripts
import scripts.common.files
import scripts.common.flags
import scripts.common.options
import scripts.data.datasets
import scripts.engine.cache
import scripts.engine.distributed
import scripts.engine.metrics
import scripts.engine.recipe
import scripts.engine.resume
import scripts.engine.screening
import scripts.engine.splits
import scripts.engine.study
import scripts.engine.tracking
import scripts.model.prompts
import scripts.model.runtime
import scripts.model.sam  # noqa: F401
from scripts.common.errors import install_for_command_line

__all__ = ["scripts"]

install_for_command_line()
