"""The GPU worker: pulls one job at a time from JetStream and runs it on an engine."""
