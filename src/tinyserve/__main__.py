"""``python -m tinyserve`` runs the command line."""

from tinyserve.cli import main

main()
