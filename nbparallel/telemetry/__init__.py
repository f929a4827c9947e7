"""Telemetry: plain records of what moved and what ran, and pure functions over them."""

from .records import KINDS, Ring, Transfer

__all__ = ["KINDS", "Ring", "Transfer"]
