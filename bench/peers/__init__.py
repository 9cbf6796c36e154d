"""Peer relays the benchmark compares the relay with."""
