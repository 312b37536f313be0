"""`python -m persona.cli`, as the console script `persona`."""

from persona.cli import main

main()
