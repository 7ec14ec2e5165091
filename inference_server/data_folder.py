"""Files of the platform's data folder that more than one package finds by name."""

from __future__ import annotations

# The operator key the embedded platform creates on its first start (local_platform), and where
# `infer` looks for a key when it is given none (inference_client.client.resolve_token).
OPERATOR_KEY_FILE = "operator.key"
