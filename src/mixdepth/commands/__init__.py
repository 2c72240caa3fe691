"""The subcommands of `mixdepth`, one thin module each: `add_arguments(parser)` and `run(args) -> int`.

A command module parses flags, calls the library and prints; the library never imports this
package (tests/test_layering.py checks it). The table of commands is `mixdepth.cli.COMMANDS`.
"""
