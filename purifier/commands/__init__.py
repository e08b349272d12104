"""One module per ``purifier`` subcommand: argument parsing and printing only; the work
is done by the library modules they call."""
