"""HTTP shapes: what goes over the wire, and nothing that runs a model.

Request and response models for ``/generate`` and OpenAI's ``/v1`` routes,
their error bodies, the checks a request passes before it is parsed, and
server-sent events. It may import pydantic, FastAPI and :mod:`helpers.protocol`;
never Ray (so it can be tested without a cluster) and never torch (so the
always-on ingress stays small).
"""
