"""Ignite and MONAI pieces the workflow configs compose: the embedding cache, the slice and
sliding-window inferers, training handlers (best prompts, early stopping, summaries, resuming),
metrics and the evaluation report, MLflow tracking, inference screening and distributed training."""
