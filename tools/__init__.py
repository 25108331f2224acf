"""upright.tools: the command-line tools, one thin absl module per command."""
import os

# TensorFlow's C++ INFO lines (oneDNN, CPU features) drown the tools' own
# output; warnings and errors still show. A user's explicit setting wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")


def run_tool(main, module_name: str) -> None:
    """app.run(main) for a console-script entry point, with a working --help.

    absl's --help shows the docstring of __main__ and the key flags of the module
    named by sys.argv[0]. Under an installed console script both are pip's
    wrapper, so the tool lends them its own docstring and flags first.
    """
    import sys
    from absl import app, flags
    module = sys.modules[module_name]
    main_module = sys.modules["__main__"]
    if main_module is not module:
        main_module.__doc__ = module.__doc__
        for flag in flags.FLAGS.get_key_flags_for_module(module_name):
            flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    app.run(main)
