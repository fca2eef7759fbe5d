"""What a job writes and publishes: the report, the model card, the checkpoint, its binding and
signature, publishing to the Hub, and restoring an original from a checkpoint."""
