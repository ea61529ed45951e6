"""The run: configuration, the run directory and its typed records, data versions, the lock, the supervisor.

No TensorFlow here."""
