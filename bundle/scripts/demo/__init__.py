"""Scaffolding for `make demo` and the tests: synthetic datasets, synthetic scenes, and the
`tiny` generalist SAM pretrained on them. Nothing in model/, data/ or engine/ imports it."""
