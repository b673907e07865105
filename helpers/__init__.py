"""The kit's Python package: the app, its engine, and what notebooks import.

Importing it first puts the kit's Ray settings into the environment
(:mod:`helpers.ray_env`), so they hold however the kit was entered.
"""

from helpers.ray_env import apply_ray_env

apply_ray_env()
