"""Thin adapters from training stacks to the public losses, one module per stack.

Each imports its stack only when it is imported itself: ``import lce_compile`` never imports transformers, TRL or
torchtitan."""
