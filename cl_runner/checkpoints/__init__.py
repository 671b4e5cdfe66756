"""File, sharded (DCP) and adapter checkpoints; safe loading."""
