"""Any OpenAI-compatible server: vLLM, llama.cpp, OpenAI itself."""

from adapters.openai.adapter import OpenAIAdapter, build
from adapters.openai.adapter import OpenAIBackend as Backend

__all__ = ["Backend", "OpenAIAdapter", "build"]
