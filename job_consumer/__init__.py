"""The job consumer: takes task ids from RabbitMQ and runs each task's model container.

One consumer per GPU (or several CPU-only ones). It reaches data only through the private
API and runs models through the Docker engine as sibling containers.
"""
