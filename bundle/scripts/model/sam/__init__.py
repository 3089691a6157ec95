"""SAM backbone: variants, torchvision-free modeling import, checkpoints and fingerprint."""

from .backbone import SamBackbone
from .variants import PIXEL_MEAN, PIXEL_STD, PROMPT_EMBED_DIM, VARIANTS, SamVariant, build_sam, get_variant
from .weights import (
    MissingSamWeightsError,
    SamCheckpointError,
    official_checkpoint,
    random_sam_weights,
    read_sam_checkpoint,
    require_weights,
    weights_fingerprint,
)

__all__ = [
    "PIXEL_MEAN",
    "PIXEL_STD",
    "PROMPT_EMBED_DIM",
    "VARIANTS",
    "MissingSamWeightsError",
    "SamBackbone",
    "SamCheckpointError",
    "SamVariant",
    "build_sam",
    "get_variant",
    "official_checkpoint",
    "random_sam_weights",
    "read_sam_checkpoint",
    "require_weights",
    "weights_fingerprint",
]
