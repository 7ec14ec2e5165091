from tests.public_api.stack import consumer, http, model_id, private_api, public_url, stack_queue

__all__ = ["consumer", "http", "model_id", "private_api", "public_url", "stack_queue"]
