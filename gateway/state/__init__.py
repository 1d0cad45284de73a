"""What the gateway mirrors from JetStream: the queue and model views, forecasts, the event hub and feed, the
result cache, the readers, quotas and upload budgets."""
