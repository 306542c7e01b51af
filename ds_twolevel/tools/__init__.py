"""The command line: cli, demo, bench."""
