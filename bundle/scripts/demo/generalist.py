"""Pretrain a `tiny` SAM the way SAM was trained, so that prompt tuning has something to steer.

No SAM weights can be had on our machines, and prompts cannot steer a random frozen SAM.
This trains the whole `tiny` model, prompt encoder included, on synthetic scenes
(``scripts.demo.scenes``): each example selects one object by a point or a box, or several by
positive clicks with negative clicks on others. The result is saved as an official-format
SAM state dict and cached by code version and seed.

    python -m scripts.demo.generalist --steps 1000 --seed 0      # prints the checkpoint path
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..common.files import atomic_torch_save, cache_root
from ..model.decoder import decode_masks
from ..model.sam import PIXEL_MEAN, PIXEL_STD, build_sam, get_variant, random_sam_weights
from .scenes import make_scene

logger = logging.getLogger(__name__)

DEFAULT_STEPS = 1000


def code_version() -> str:
    """A hash of the code that decides the generalist's weights."""
    scripts = Path(__file__).parents[1]
    digest = hashlib.sha256()
    for name in (
        "demo/generalist.py",
        "demo/scenes.py",
        "demo/noise.py",
        "model/sam/variants.py",
        "model/sam/weights.py",
    ):
        digest.update((scripts / name).read_bytes())
    return digest.hexdigest()[:12]


def generalist_path(seed: int = 0, steps: int = DEFAULT_STEPS) -> Path:
    """Where the generalist of ``seed`` and ``steps`` is cached: in the PTSAM cache, named by the code's version."""
    return cache_root() / f"sam_tiny_generalist_{code_version()}_s{seed}_n{steps}.pth"


MAX_POINTS = 5  # every prompt is padded to 6 tokens so a batch decodes together


def _point_in(rng: np.random.Generator, mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    i = rng.integers(len(ys))
    return [xs[i] + 0.5, ys[i] + 0.5]


def _prompt(rng: np.random.Generator, masks: np.ndarray) -> tuple[list, list, list | None, np.ndarray]:
    """A SAM-style prompt and its target: one object by a point or a box, or several objects
    by positive clicks with negative clicks on others (the target is the union)."""
    k = len(masks)
    mode = rng.choice(["point", "box", "clicks"], p=[0.35, 0.3, 0.35])
    if mode == "clicks" and k >= 2:
        order = rng.permutation(k)
        n_pos = rng.integers(1, min(3, k - 1) + 1)
        n_neg = rng.integers(0, min(2, k - n_pos) + 1)
        targets, others = order[:n_pos], order[n_pos : n_pos + n_neg]
        coords = [_point_in(rng, masks[i]) for i in targets] + [_point_in(rng, masks[i]) for i in others]
        labels = [1] * len(targets) + [0] * len(others)
        return coords, labels, None, masks[targets].any(axis=0)
    i = rng.integers(k)
    if mode == "box":
        ys, xs = np.nonzero(masks[i])
        box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64) + rng.normal(0, 2, 4)
        return [], [], box.tolist(), masks[i]
    return [_point_in(rng, masks[i])], [1], None, masks[i]


def _batch(rng: np.random.Generator, size: int, batch: int):
    images, targets, prompts = [], [], []
    for _ in range(batch):
        scene = make_scene(rng, size, style="shifted" if rng.random() < 0.2 else "plain")
        coords, labels, box, target = _prompt(rng, scene.masks)
        images.append(scene.image)
        targets.append(target.astype(np.float32))
        prompts.append((coords, labels, box))
    return np.stack(images), np.stack(targets), prompts


def _prompt_embeddings(sam: torch.nn.Module, prompts: list) -> torch.Tensor:
    """(B, 1, 6, 256): each prompt's tokens, padded with SAM's not-a-point entries (label -1)."""
    sparse = []
    for coords, labels, box in prompts:
        # without a box the encoder appends one padding point itself; a box adds two tokens
        pad = MAX_POINTS - len(coords) - (0 if box is None else 1)
        coords = torch.tensor([coords + [[0.0, 0.0]] * pad], dtype=torch.float32).reshape(1, -1, 2)
        labels = torch.tensor([labels + [-1] * pad], dtype=torch.float32).reshape(1, -1)
        boxes = None if box is None else torch.tensor([box], dtype=torch.float32)
        tokens, _ = sam.prompt_encoder(points=(coords, labels), boxes=boxes, masks=None)
        sparse.append(tokens)
    return torch.stack(sparse)


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = logits.sigmoid()
    dice = 1 - (2 * (prob * target).sum((-2, -1)) + 1) / (prob.sum((-2, -1)) + target.sum((-2, -1)) + 1)
    return bce + dice.mean()


def pretrain(steps: int = DEFAULT_STEPS, seed: int = 0, batch: int = 4, lr: float = 5e-4) -> torch.nn.Module:
    """Train the whole `tiny` SAM with point and box prompts; returns stock segment-anything ``Sam``."""
    variant = get_variant("tiny")
    sam = build_sam(variant)
    random_sam_weights(sam, seed)
    sam.train()
    size = variant.img_size
    rng = np.random.default_rng(seed)
    optimiser = torch.optim.AdamW(sam.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps, pct_start=0.05)
    mean, std = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
    start = time.time()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for step in range(steps):
            images, targets, prompts = _batch(rng, size, batch)
            embeddings = sam.image_encoder((torch.from_numpy(images) - mean) / std)
            low_res = decode_masks(
                sam.mask_decoder,
                embeddings,
                sam.prompt_encoder.get_dense_pe(),
                sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1),
                _prompt_embeddings(sam, prompts),
            )
            logits = F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False)[:, 0]
            loss = _loss(logits, torch.from_numpy(targets))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            if step % 100 == 0 or step == steps - 1:
                elapsed = time.time() - start
                logger.info("generalist step %d/%d loss %.4f (%.0f s)", step + 1, steps, loss.item(), elapsed)
    return sam.eval()


def ensure_generalist(seed: int = 0, steps: int = DEFAULT_STEPS) -> Path:
    """The cached generalist checkpoint, pretrained first if it is not there yet."""
    path = generalist_path(seed, steps)
    if not path.is_file():
        logger.info("pretraining the tiny generalist (%d steps, seed %d) into %s", steps, seed, path)
        sam = pretrain(steps, seed)
        atomic_torch_save(sam.state_dict(), path)
    return path


def main(steps: int = DEFAULT_STEPS, seed: int = 0) -> str:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return str(ensure_generalist(seed, steps))


if __name__ == "__main__":
    import fire

    fire.Fire(main)
