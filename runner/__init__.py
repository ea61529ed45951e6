"""bottleneck-runner: transfer learning on cached bottlenecks with exact, crash-proof resume."""

__version__ = "0.1.0"
