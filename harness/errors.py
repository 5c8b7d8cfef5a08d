"""Errors the user can fix. The plugin turns each into a one-line pytest usage error."""


class HarnessUsageError(Exception):
    """Bad input from the user: the message is one line that says what to change."""


class VariantRefused(HarnessUsageError):
    """The model loads, but transformers refuses one variant of it (an attention implementation it
    does not support, e.g. SDPA for Gemma-2's logit softcapping): a property of the model, so the
    checks that need the variant skip with this message instead of failing."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (its type name when it has none): the part of a
    library's error that fits in a one-line usage error or skip reason."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
