# The kit's Ray settings, for Ray's own `ray` command in a shell. Source it,
# don't run it. Their one list is helpers/ray_env.py, which says what each is
# for; the kit's Python code (notebooks, the app, the `serve` command) applies
# it on `import helpers`, so only commands outside Python need this file.
_kit_root="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")/.." && pwd)"
eval "$(cd "$_kit_root" && python3 -c 'from helpers.ray_env import shell_exports; print(shell_exports())')"
unset _kit_root
