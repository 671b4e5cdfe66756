"""Task streams: ordered tasks built from a config (synthetic, TRACE, O-LoRA, custom)."""
from cl_runner.streams.task import Example, Task, TaskStream

__all__ = ["Example", "Task", "TaskStream"]
