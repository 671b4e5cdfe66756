"""The run config: typed schema, validation, override checks, config paths."""
