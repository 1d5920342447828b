"""Data: readers, tokenization into token datasets, and the training loader."""
