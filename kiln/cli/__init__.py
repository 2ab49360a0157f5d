"""The `kiln` command: thin subcommands over the packages below it (it imports them; they
never import it)."""
