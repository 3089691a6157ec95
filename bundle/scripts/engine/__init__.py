"""Ignite and MONAI pieces the workflow configs compose: the embedding cache, checkpoints and
resuming, early stopping, per-epoch summaries, evaluation reports and inference screening."""
