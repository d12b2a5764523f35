"""Data layer: AnnData and MuData handling, validation, sparse mini-batching, bundled and real-data loaders."""

from .datasets import pbmc68k_counts
from .images import (
    IDXFormatError,
    ImageData,
    ImageFilesNotFoundError,
    load_digits_images,
    load_images,
    load_mnist,
    read_idx,
    write_idx,
)
from .anndata import GeneMismatchError, align_genes, check_labels_key, get_matrix
from .loader import Batch, BatchLoader, batch_indices
from .matrix import CountValidationError, RowMatrix, validate_counts
from .modalities import HStackRowMatrix, Modalities, default_modality_likelihood, is_mudata, read_modalities

__all__ = [
    "RowMatrix", "validate_counts", "CountValidationError",
    "Modalities", "read_modalities", "HStackRowMatrix", "is_mudata", "default_modality_likelihood",
    "get_matrix", "check_labels_key", "align_genes", "GeneMismatchError",
    "Batch", "BatchLoader", "batch_indices",
    "pbmc68k_counts",
    "load_images", "load_digits_images", "load_mnist", "read_idx", "write_idx", "ImageData",
    "IDXFormatError", "ImageFilesNotFoundError",
]
