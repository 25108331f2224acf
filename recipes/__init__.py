"""upright.recipes: the shipped training recipes, absl flagfiles.

`train --flagfile=NAME.flags` (or `--flagfile=NAME`) finds them from any folder
after a plain `pip install`: a flagfile that is not a file there is looked up
here. A recipe includes base.flags and overrides it; a nested `--flagfile=`
inside a file is resolved relative to that file (tools.expand_flagfiles).
"""
