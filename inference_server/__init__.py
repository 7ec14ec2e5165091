"""Shared pieces of the InferenceServer platform: the wire contract, safe zips, settings, serving.

Imports no other package of the project (tests/inference_server/test_layering.py): every service
imports it."""
