"""upright.tools: the command-line tools, one thin absl module per command."""
