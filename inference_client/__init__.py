"""inference_client."""
