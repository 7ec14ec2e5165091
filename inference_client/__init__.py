"""Python client and `infer` command line for the InferenceServer public API."""

from inference_client.client import InferenceClient, InferenceClientError, resolve_token

__all__ = ["InferenceClient", "InferenceClientError", "resolve_token"]
