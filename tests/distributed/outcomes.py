"""How a rank function reports an expected failure back to the test (plain data, JSON-safe)."""

from __future__ import annotations


def error_of(fn) -> dict | None:
    """``{"type", "message"}`` of what ``fn()`` raised, or None when it returned."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - described for the test
        return {"type": type(exc).__name__, "message": str(exc)}
    return None
