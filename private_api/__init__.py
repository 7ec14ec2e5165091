"""private_api."""
