"""Shared pieces of the InferenceServer platform: the wire contract, safe zips, the CLI."""
