"""Fault tolerance: real processes over loopback through a proxy that breaks connections."""
