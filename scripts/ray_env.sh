# Environment shared by every Ray command the kit runs. Source it, don't run it.
#
# The Python side of the same settings is helpers/ray_env.py (a test keeps them equal);
# the kit applies it on import, so only commands outside Python need this file.
# RAY_AUTH_MODE=token: Ray 2.60 turns token authentication on for clusters it
#   starts, and the `ray`/`serve` CLIs only send the token when this is set.
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: despite its name, this makes Ray use the
#   loopback address for every port of a local cluster instead of the
#   machine's network address, so nothing we start is reachable from outside.
export RAY_AUTH_MODE=token
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_USAGE_STATS_ENABLED=0
