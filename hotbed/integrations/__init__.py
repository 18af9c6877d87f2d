"""Adapters that let other agent frameworks run on hotbed (optional extras)."""
