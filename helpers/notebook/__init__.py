"""What the notebooks import: the cluster, deploying, the HTTP client, the
prompt box, the configuration table and the replica monitor.

It talks to the app over HTTP and to Ray's controller, and never imports
torch: a notebook kernel stays light, and what it shows is what a client of
the server sees. It may import Ray, :mod:`helpers.serve` (to deploy),
:mod:`helpers.api` (what the server's error objects mean), :mod:`helpers.config`
and :mod:`helpers.engine.hub` (no torch: fetching a hub model before the
deploy).
"""
