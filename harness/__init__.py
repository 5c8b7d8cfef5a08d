"""LLM inference validation harness: a plain library plus one pytest plugin (harness.plugin)."""

from harness.errors import HarnessUsageError

__all__ = ["HarnessUsageError"]
__version__ = "0.1.0"
