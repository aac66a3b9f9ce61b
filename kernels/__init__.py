"""Fused nearest-codebook search (Triton) with its torch path and float64 reference."""

from .nearest_code import HAVE_TRITON, nearest_code, nearest_code_reference, nearest_code_torch

__all__ = ["HAVE_TRITON", "nearest_code", "nearest_code_reference", "nearest_code_torch"]
