"""The real model deployment plus one way to break it, for the fault tests.

Only the test calls ``break_the_model``; ``check_health`` and everything else
are LLMServer's own. The test registers this module to be pickled by value, so
replicas need not import anything from ``tests``.
"""

import torch

from helpers.serve.model_server import LLMServer


class BreakableLLMServer(LLMServer):
    def break_the_model(self) -> None:
        """Poison the embeddings, as a corrupted weight or a failed device would."""
        with torch.no_grad():
            self.engine.model.model.embed_tokens.weight.fill_(float("nan"))
