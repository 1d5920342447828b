"""Every on-disk contract lmforge writes and reads, in one place.

`run_dir` (layout and lineage of `runs/<name>/`), `checkpoint` (DCP step dirs and the
`latest` pointer), `model_dir` + `hf` (the Hugging Face model dir and its weight/config
mapping), `token_dataset` (the token dataset manifest), `adapter` (LoRA adapter dirs),
`loading` (a model and tokenizer from any of them), `weights` (a model's weight files) and
`hashes` (content hashes). Other packages ask `store` for paths and hashes; none builds them
itself.

This package imports nothing at import time, so any layer above it can import a submodule.
"""
