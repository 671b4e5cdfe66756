"""Helpers strategies share (model structure: blocks, stacks, positions). Not strategies:
the registry does not import this package."""
