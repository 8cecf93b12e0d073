"""Replicate's predictions API (Llama 3 8B and 8B Instruct): `kind: replicate` backends."""

from adapters.replicate.adapter import ReplicateAdapter, build
from adapters.replicate.config import ReplicateBackend as Backend
from adapters.replicate.config import ReplicateTimeouts

__all__ = ["Backend", "ReplicateAdapter", "ReplicateTimeouts", "build"]
