"""job_consumer."""
