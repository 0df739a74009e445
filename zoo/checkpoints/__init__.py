"""Checkpoint conversion: Hugging Face safetensors <-> zoo models (`zoo.checkpoints.hf`)."""

from zoo.checkpoints.hf import (
  EXPORT_FAMILIES,
  HFTokenizer,
  check_destination,
  convert_hf_to_orbax,
  export_hf,
  hf_model_config,
  load_hf_checkpoint,
  model_config_from_arch,
  save_orbax,
  write_dir,
)
from zoo.checkpoints.hf_spec import SUPPORTED, ConversionError, check_dir
from zoo.checkpoints.safetensors_io import SafetensorsError

__all__ = [
  "EXPORT_FAMILIES",
  "SUPPORTED",
  "ConversionError",
  "HFTokenizer",
  "SafetensorsError",
  "check_destination",
  "check_dir",
  "convert_hf_to_orbax",
  "export_hf",
  "hf_model_config",
  "load_hf_checkpoint",
  "model_config_from_arch",
  "save_orbax",
  "write_dir",
]
