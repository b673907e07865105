"""Ray Serve: the application, its two deployments and the calls between them.

The ingress (``ingress.py``) answers HTTP and never loads the model; the model
deployment (``model_server.py``) owns an engine and imports it only when a
replica starts. This package may import Ray, :mod:`helpers.api`,
:mod:`helpers.protocol`, :mod:`helpers.engine.hub` (which loads no torch:
``build_app`` downloads a hub model at deploy time) and
:mod:`helpers.engine.errors` (the loader's error, which a failed download
names); the rest of the engine only inside the model replica. Every use
of Ray's private APIs, and the one patch of Serve, is in ``ray_private.py``.
"""
