"""Telemetry: plain records of what moved and what ran, and pure functions over them."""

from .records import KINDS, TRANSPORTS, Ring, Transfer

__all__ = ["KINDS", "TRANSPORTS", "Ring", "Transfer"]
