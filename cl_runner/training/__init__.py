"""Building a run, the continual loop, batching, sampling, the anneal."""
