"""Compression: weight quantisation (quantize.py)."""
