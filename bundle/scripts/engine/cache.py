"""The embedding cache: SAM's frozen encoder runs once per distinct input, not once per step.

With no image-encoder prompts the encoder is frozen and its output for a given
preprocessed image never changes. ``EncodeImaged`` puts the image's embedding under the
``embedding`` key, kept on disk and, up to ``ram_mb``, in memory (least recently used first
out), under a key made of the image's bytes (as preprocessed: a recipe knob that changes what
the encoder sees, the layout included, changes the key), the backbone's fingerprint (which
covers the variant and its weights), the encoder's code and attention path, and the cache
format: a second run reuses it, and a change of code never serves a stale embedding.
``prepare_batch`` then hands the network the embeddings with ``embedded=True``: the network
decodes them without guessing what it was given.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from ..common.files import atomic_torch_save
from ..common.flags import flag, optional_flag
from ..model.encoder import encoder_version
from .distributed import unwrap

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2  # what a cache file holds; raise it when that changes
_DTYPES = {"float32": torch.float32, "float16": torch.float16}  # float16: half the disk and memory


def use_cache(cache_embeddings: bool | None, n_ie_prompts: int, augment: bool = False, scale: str = "resize") -> bool:
    """Whether to cache: on by default (null), but never with image-encoder prompts, augmentation
    or random native-scale crops, which change the encoder's output every epoch; a note says why
    (a warning where the cache was asked for explicitly)."""
    asked, augment = optional_flag(cache_embeddings), flag(augment)
    if asked is False:
        return False
    if n_ie_prompts > 0:
        why = "image-encoder prompts change the encoder's output as they learn"
    elif augment or scale == "native":
        change = "augmentation changes" if augment else "native-scale training takes random crops of"
        why = f"{change} the image every epoch"
    else:
        return True
    logger.log(logging.WARNING if asked else logging.INFO, "embedding cache off: %s", why)
    return False


class EncodeImaged(MapTransform):
    """Image (3, S, S) or slice stack (3, n, S, S) -> ``embedding`` (256, S/16, S/16) or
    (256, n, ...) with the image's metadata; the image stays (its metadata places the
    prediction). ``cache_dir=None`` keeps the cache in memory only; ``enabled=False`` adds
    nothing (the configs switch the cache with it). ``dtype="float16"`` keeps embeddings at
    half the size on disk and in memory; the network still gets float32."""

    def __init__(
        self,
        network: torch.nn.Module,
        keys: KeysCollection = "image",
        embedding_key: str = "embedding",
        cache_dir: str | Path | None = None,
        enabled: bool = True,
        device: str | torch.device | None = None,
        batch_size: int = 8,
        ram_mb: float = 1024,
        dtype: str = "float32",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.network = unwrap(network)
        self.embedding_key = embedding_key
        self.enabled = flag(enabled)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.device = device
        self.batch_size = batch_size
        self.ram_bytes = int(float(ram_mb) * 2**20)
        if dtype not in _DTYPES:
            raise ValueError(f"cache dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.dtype = _DTYPES[dtype]  # as kept on disk and in memory; the network gets float32
        self.memory: OrderedDict[str, torch.Tensor] = OrderedDict()  # least recently used first
        self.held_bytes = 0
        net = self.network
        path = f"{net.fused_attention}:{net.encoder_engine}:{net.encoder_precision}"  # what computes the embeddings
        self.version = f"{CACHE_FORMAT}:{encoder_version()}:{path}:{net.backbone.fingerprint}:{dtype}"

    def key_of(self, image: torch.Tensor) -> str:
        digest = hashlib.sha256(self.version.encode())
        digest.update(str(tuple(image.shape)).encode())
        digest.update(image.detach().cpu().contiguous().numpy())  # the buffer itself, no copy
        return digest.hexdigest()[:32]

    def _encode(self, image: torch.Tensor) -> torch.Tensor:
        device = self.device or next(self.network.parameters()).device
        stack = image.reshape(3, -1, *image.shape[-2:]).transpose(0, 1)  # n, 3, S, S
        with torch.no_grad():
            out = torch.cat([self.network.encode(c.to(device)).cpu() for c in stack.split(self.batch_size)])
        out = out.transpose(0, 1)  # 256, n, h, w
        return out if image.ndim == 4 else out[:, 0]

    def _remember(self, key: str, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.ram_bytes:  # a whole volume beyond the budget: served from disk only
            return
        self.memory[key] = value
        self.held_bytes += size
        while self.held_bytes > self.ram_bytes:
            _, old = self.memory.popitem(last=False)
            self.held_bytes -= old.numel() * old.element_size()

    def embedding(self, image: torch.Tensor) -> torch.Tensor:
        return self._stored(image).float()

    def _stored(self, image: torch.Tensor) -> torch.Tensor:
        key = self.key_of(image)
        if key in self.memory:
            self.memory.move_to_end(key)
            return self.memory[key]
        path = self.cache_dir / f"{key}.pt" if self.cache_dir else None
        value = None
        if path is not None and path.is_file():
            try:
                value = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # a damaged cache file is recomputed
                logger.warning("embedding cache file %s unreadable (%s): recomputing", path, err)
        if value is None:
            value = self._encode(image).to(self.dtype)
            if path is not None:
                atomic_torch_save(value, path)
        self._remember(key, value)
        return value

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        if not self.enabled:
            return d
        for key in self.key_iterator(d):
            image = d[key]
            meta = dict(image.meta) if isinstance(image, MetaTensor) else {}
            plain = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
            d[self.embedding_key] = MetaTensor(self.embedding(plain), meta=meta)
        return d


def prepare_batch(cached: bool) -> Callable:
    """The trainer's and evaluator's ``prepare_batch``: images and labels as MONAI's default does,
    or with the cache on, the embeddings, the labels and ``embedded=True`` for the network."""
    cached = flag(cached)

    def prepare(batch: Mapping, device: Any = None, non_blocking: bool = False, **kwargs: Any) -> tuple:
        inputs = batch["embedding"] if cached else batch["image"]
        inputs = inputs.to(device=device, non_blocking=non_blocking, **kwargs)
        label = batch.get("label")  # inference: absent, or a path nobody loaded
        label = label.to(device=device, non_blocking=non_blocking, **kwargs) if torch.is_tensor(label) else None
        return inputs, label, (), {"embedded": True} if cached else {}

    return prepare
