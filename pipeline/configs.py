"""Frozen config dataclasses seen flat: one name per setting, as flags and JSON show them.

A config is declared once, as a dataclass whose fields carry their help text
(and, where it applies, their choices) in the field metadata:

    @dataclasses.dataclass(frozen=True)
    class StageConfig:
        epochs: int = configs.field(15, "epochs (0 skips the stage)")

    @dataclasses.dataclass(frozen=True)
    class TrainConfig:
        stage1: StageConfig = configs.field(StageConfig(), "Stage 1")

A nested config's fields take the outer field's name as a prefix: the flat
name of `config.stage1.epochs` is `stage1_epochs`. tools/ defines and reads
the command-line flags from `flat_fields` (tools.define_config_flags), the
trainer pins `flatten(config)` in model_dir/config.json, and `--dry_run`
prints it. No absl here: library code takes the config, never flags.

Metadata keys: "help" (str), "choices" (tuple of allowed strings),
"lower_bound" (int), "flag_default" (the flag's default where it differs from
the field's, e.g. None for a required flag), "parse" (text -> value, applied to
a flag's value).
"""
import dataclasses


def field(default, help: str, **metadata):
    """A dataclass field with its help text (and choices, bounds, ...) attached.

    A dataclass default (a nested frozen config) is shared safely: it is frozen.
    """
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: default,
                                 metadata={"help": help, **metadata})
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


@dataclasses.dataclass(frozen=True)
class FlatField:
    """One setting of a config under its flat name."""
    name: str             # "stage1_epochs"
    path: tuple           # ("stage1", "epochs")
    type: object          # the innermost field's annotation: int, float, bool, str, str | None
    default: object       # the value in cls()
    help: str             # the outer fields' help, then the field's own: "Stage 1: epochs ..."
    metadata: dict        # the innermost field's metadata


def flat_fields(cls) -> list:
    """FlatField of every leaf setting of config class `cls`, in declaration order."""
    return list(_flat_fields(cls, cls(), (), ""))


def _flat_fields(cls, instance, path, help_prefix):
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        help_text = f.metadata.get("help", "")
        if dataclasses.is_dataclass(f.type):
            yield from _flat_fields(f.type, value, (*path, f.name),
                                    f"{help_prefix}{help_text}: ")
        else:
            yield FlatField(name="_".join((*path, f.name)), path=(*path, f.name), type=f.type,
                            default=value, help=help_prefix + help_text,
                            metadata=dict(f.metadata))


def flatten(config) -> dict:
    """{flat name: value} of every leaf setting (config.json, --dry_run)."""
    return {f.name: _get(config, f.path) for f in flat_fields(type(config))}


def replace(config, **changes):
    """A copy of `config` with settings changed by flat name:
    replace(config, stage1_lr=0.5, seed=3)."""
    by_name = {f.name: f.path for f in flat_fields(type(config))}
    unknown = sorted(set(changes) - set(by_name))
    if unknown:
        raise TypeError(f"{type(config).__name__} has no setting {', '.join(unknown)}")
    for name, value in changes.items():
        config = _set(config, by_name[name], value)
    return config


def from_flat(cls, values: dict):
    """cls() with the settings in `values` (flat names) set."""
    return replace(cls(), **values)


def _get(config, path):
    for name in path:
        config = getattr(config, name)
    return config


def _set(config, path, value):
    if len(path) == 1:
        return dataclasses.replace(config, **{path[0]: value})
    inner = _set(getattr(config, path[0]), path[1:], value)
    return dataclasses.replace(config, **{path[0]: inner})
