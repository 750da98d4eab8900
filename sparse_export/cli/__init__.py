"""The command line: a Typer app whose commands parse, build an options object and call one function."""
