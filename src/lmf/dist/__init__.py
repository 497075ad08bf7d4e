"""Distributed runtime: process group, rank helpers, environment fingerprint, fault tolerance."""
