"""Paged KV cache: pages from the arena's KV pool, block tables per sequence."""
