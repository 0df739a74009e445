"""TFDS builders for the embedded datasets, grain input pipelines and the byte-level tokenizer."""
