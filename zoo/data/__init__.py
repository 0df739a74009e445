"""TFDS builders for the embedded datasets, grain input pipelines and the byte-level tokenizer.

Public API: `make_iterator`, `dataset_info`, `default_data_config` (the data config keys are documented in
`zoo.data.config`) and `zoo.data.tokenizer.ByteTokenizer`.
"""

from zoo.data.config import default_data_config
from zoo.data.pipeline import dataset_info, make_iterator
from zoo.data.tokenizer import ByteTokenizer

__all__ = ["ByteTokenizer", "dataset_info", "default_data_config", "make_iterator"]
