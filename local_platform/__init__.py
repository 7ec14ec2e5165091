"""The embedded platform: every service as a local process on one machine, the `inference-server`
command that starts it, and the example models it registers. The one package that wires the
services together, so it may import them all; none of them imports it."""
