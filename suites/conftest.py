"""Fixtures shared by the generation suites (cache equivalence, decoding shortcuts)."""

import pytest

from harness import generation as gen


@pytest.fixture(scope="session")
def dtype_name(dtype):
    """The run's compute dtype by name, as the comparison rules take it ('bfloat16')."""
    return str(dtype).removeprefix("torch.")


@pytest.fixture(scope="session")
def pad(tokenizer):
    return gen.pad_id(tokenizer)
