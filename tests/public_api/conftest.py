from tests.public_api.stack import consumer, http, model_id, private_api, public_url

__all__ = ["consumer", "http", "model_id", "private_api", "public_url"]
