"""public_api."""
