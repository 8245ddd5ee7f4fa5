"""``python -m safespec`` runs the same CLI as the ``safespec`` console script."""

from .cli import main

main(prog_name="safespec")
