"""upright.tools: the command-line tools, one thin absl module per command.

Every tool starts through `run_tool`, which gives all of them the same manners:
`-h`/`--help` print the tool's docstring and flags and exit 0; a usage error
(a bad or missing flag, a missing flagfile, a UsageError from main) is one
`TOOL: error: ...` line, then a short usage line, exit 2; TensorFlow's C++
start-up lines are not shown unless `-v 1` (or more) is given.
"""
import os
import re
import sys

from upright.pipeline import quiet

# TensorFlow's C++ log lines (oneDNN, CPU features, CUDA probes, converter
# chatter) drown the tools' own output; errors still show. A user's explicit
# setting wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Hides TensorFlow's C++ start-up lines (see pipeline/quiet.py); the name the
# tools and tests use.
native_startup_hidden = quiet.native_logs_hidden


def import_tensorflow(show_native_logs: bool = False):
    """Imports TensorFlow and initialises its devices with the C++ start-up
    lines hidden (see native_startup_hidden); returns the module."""
    with native_startup_hidden(show_native_logs):
        import tensorflow as tf
        tf.config.list_physical_devices()   # the CUDA probe logs here, once
    if not show_native_logs:
        # TensorFlow's Python INFO lines (SavedModel signature renames, saver
        # timings, "Using new converter") are for its developers; some go
        # through TensorFlow's logger, some straight through absl's.
        from absl import logging
        tf.get_logger().setLevel("WARNING")
        logging.set_verbosity(logging.WARNING)
    return tf


class FlagfileError(ValueError):
    """A flagfile that cannot be found or read, or that includes itself."""


def recipes_dir() -> str:
    """The folder of the shipped recipes (upright.recipes, recipes/ in the repository)."""
    from upright import recipes
    return os.path.dirname(recipes.__file__)


def recipe_names() -> list:
    return sorted(n[:-len(".flags")] for n in os.listdir(recipes_dir()) if n.endswith(".flags"))


def describe_recipes() -> str:
    """'Recipes ...' and one line per shipped recipe: its name and first comment line."""
    lines = ["Recipes shipped with upright (--flagfile=NAME.flags works from any folder):"]
    for name in recipe_names():
        with open(os.path.join(recipes_dir(), name + ".flags"), encoding="utf-8") as f:
            first = next((line.lstrip("#/ ").strip() for line in f if line.startswith("#")), "")
        lines.append(f"  {name + '.flags':18s}{first}")
    return "\n".join(lines) + "\n"


def _find_flagfile(name: str, including_dir) -> str:
    """The path of flagfile `name`: relative to the file that includes it (or
    to the current folder on the command line), else a shipped recipe."""
    here = os.path.join(including_dir, name) if including_dir else name
    candidates = [os.path.expanduser(here)]
    if not os.path.isabs(name) and os.sep not in name:
        candidates += [os.path.join(recipes_dir(), name),
                       os.path.join(recipes_dir(), name + ".flags")]
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise FlagfileError(f"cannot open flagfile {name!r}: no such file"
                        + (f" in {including_dir}" if including_dir else "")
                        + f", and no shipped recipe of that name ({', '.join(recipe_names())})")


def _flagfile_lines(name: str, including_dir, stack: tuple) -> list:
    path = _find_flagfile(name, including_dir)
    key = os.path.realpath(path)
    if key in stack:
        raise FlagfileError(f"flagfile {path} includes itself")
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as e:
        raise FlagfileError(f"cannot read flagfile {path}: {e}") from None
    args = []
    for line in lines:
        if not line or line.startswith(("#", "//")):
            continue
        nested = re.match(r"^--?flagfile=(.+)$", line)
        if nested:
            args += _flagfile_lines(nested.group(1), os.path.dirname(path), (*stack, key))
        else:
            args.append(line)
    return args


def expand_flagfiles(argv: list) -> list:
    """argv with every `--flagfile=F` replaced by F's flags, in place (later
    flags still win). Unlike absl, a nested flagfile is resolved relative to
    the file that names it, so a recipe works from any folder, and a name that
    is not a file is looked up among the shipped recipes (`train
    --flagfile=b1.flags` after a plain pip install)."""
    out, i = [argv[0]], 1
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            out += argv[i:]
            break
        match = re.match(r"^--?flagfile(?:=(.*))?$", arg)
        if match and match.group(1) is None and i + 1 < len(argv):
            i += 1
            out += _flagfile_lines(argv[i], None, ())
        elif match and match.group(1) is not None:
            out += _flagfile_lines(match.group(1), None, ())
        else:
            out.append(arg)
        i += 1
    return out


def _tool_name(module_name: str) -> str:
    """"train" for upright.tools.train, also when it runs as __main__ (python -m)."""
    spec = getattr(sys.modules.get(module_name), "__spec__", None)
    return (spec.name if spec is not None and spec.name else module_name).rsplit(".", 1)[-1]


def _usage_line(module) -> str:
    """The first example command of the tool's docstring."""
    for line in (module.__doc__ or "").splitlines()[1:]:
        if line.startswith("    ") and line.strip():
            return line.split("  #")[0].strip()   # without the example's comment
    return _tool_name(module.__name__)


def fail_usage(module_name: str, message: str) -> None:
    """Ends the tool as a usage error: one error line, a usage line, exit 2."""
    name = _tool_name(module_name)
    module = sys.modules[module_name]
    print(f"{name}: error: {message}", file=sys.stderr)
    print(f"usage: {_usage_line(module)}   (all flags: {name} --help)", file=sys.stderr)
    sys.exit(2)


def run_tool(main, module_name: str, *, tensorflow: bool = True) -> None:
    """app.run(main) for a console-script entry point, with the manners above.

    absl's --help shows the docstring of __main__ and the key flags of the module
    named by sys.argv[0]. Under an installed console script both are pip's
    wrapper, so the tool lends them its own docstring and flags first.
    `tensorflow`: import TensorFlow quietly before main (tools that use it).
    """
    from absl import app, flags
    module = sys.modules[module_name]
    main_module = sys.modules["__main__"]
    if main_module is not module:
        main_module.__doc__ = module.__doc__
        for flag in flags.FLAGS.get_key_flags_for_module(module_name):
            flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    argv = list(sys.argv)
    options = argv[1:argv.index("--")] if "--" in argv else argv[1:]
    if any(a in ("-h", "--help", "--helpshort", "-?") for a in options):
        app.define_help_flags()
        app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)
    if "--helpfull" in options:
        app.define_help_flags()
        app.usage(shorthelp=False, writeto_stdout=True, exitcode=0)

    def parse(args):
        try:
            return flags.FLAGS(expand_flagfiles(args))
        except FlagfileError as e:
            fail_usage(module_name, str(e))
        except flags.Error as e:
            message = re.sub(r"^ERROR:+\s*", "", str(e).replace("\n", " "))
            # absl's words for a missing required flag, said plainly.
            message = re.sub(r"^flag --(\w+)=None: Flag --\1 must have a value other than "
                             r"None\.$", r"--\1 is required", message)
            fail_usage(module_name, message)

    def quiet_main(args):
        if tensorflow:
            import_tensorflow(show_native_logs=flags.FLAGS["verbosity"].value >= 1)
        try:
            return main(args)
        except app.UsageError as e:
            fail_usage(module_name, str(e))

    app.run(quiet_main, argv=argv, flags_parser=parse)


def define_config_flags(config_class, module_name: str) -> None:
    """One flag per setting of a config dataclass (pipeline/configs.py), named,
    typed and documented by its field: bool -> DEFINE_bool, int -> DEFINE_integer,
    float -> DEFINE_float, a field with "choices" -> DEFINE_enum, else
    DEFINE_string. The flags belong to `module_name` (the tool: its --help and
    its flags file list them)."""
    from absl import flags
    from upright.pipeline import configs
    # absl files the flags of the main module under sys.argv[0] (python -m TOOL).
    owner = sys.argv[0] if module_name == "__main__" else module_name
    for f in configs.flat_fields(config_class):
        meta = f.metadata
        default = meta.get("flag_default", f.default)
        kwargs = {"module_name": owner}
        if "choices" in meta:
            flags.DEFINE_enum(f.name, default, meta["choices"], f.help, **kwargs)
        elif f.type is bool:
            flags.DEFINE_bool(f.name, default, f.help, **kwargs)
        elif f.type is int:
            flags.DEFINE_integer(f.name, default, f.help, lower_bound=meta.get("lower_bound"),
                                 **kwargs)
        elif f.type is float:
            flags.DEFINE_float(f.name, default, f.help, **kwargs)
        else:
            flags.DEFINE_string(f.name, default, f.help, **kwargs)


def config_from_flags(config_class):
    """The config of the parsed flags (see define_config_flags): a flag left at
    None keeps the field's default; a field's "parse" turns the flag's text
    into its value."""
    from absl import flags
    from upright.pipeline import configs
    values = {}
    for f in configs.flat_fields(config_class):
        value = flags.FLAGS[f.name].value
        if value is None:
            continue
        values[f.name] = f.metadata["parse"](value) if "parse" in f.metadata else value
    return configs.from_flat(config_class, values)


def write_flags_file(module_name: str, path: str, *, leave_out=("dry_run",)) -> str:
    """Writes the tool's flags, every one with its value (None ones left out),
    to `path`, so that `TOOL --flagfile=PATH` replays the run."""
    from absl import flags
    from upright.pipeline import fileio
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    module_flags = flags.FLAGS.get_flags_for_module(sys.modules[module_name])
    lines = [f.serialize() for f in sorted(module_flags, key=lambda f: f.name)
             if f.name not in leave_out and f.value is not None]
    with fileio.atomic_write(path, "w", encoding="utf-8") as f:
        f.write(f"# {_tool_name(module_name)} flags; replay with: "
                f"{_tool_name(module_name)} --flagfile={path}\n")
        f.write("\n".join(lines) + "\n")
    return path


def fail(module_name: str, message, status: int = 2) -> None:
    """Ends the tool with one line on stderr, `TOOL: error: ...` (the message's
    first line), and exit `status` (2: the flags need changing; 1: the run could
    not go on)."""
    print(f"{_tool_name(module_name)}: error: {str(message).splitlines()[0]}", file=sys.stderr)
    sys.exit(status)
