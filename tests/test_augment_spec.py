"""Policy spec strings (augment.parse_policy): what parses to what.

tests/data/augment_policy_specs.json holds, for every spec found in the
tests, recipes, README, BUILD.md and benchmarks when the parser moved to
Python's `ast` (issue 12), plus 60 generated ones, the policy the old
hand-written parser built: each op's class, salt (its seed path) and
parameters, recursively. The parser must keep building exactly those.
"""
import glob
import json
import os

import pytest

from upright.pipeline import augment

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Specs written in the repository when the parser moved to `ast` (with where).
FOUND_SPECS = (
    augment.DEFAULT_SPEC, "default", "none",
    # recipes/cpu.flags --augment_policy
    "sometimes(0.5, jpeg(60,80)); add(-15,15) | multiply(0.8,1.2) | hue_saturation(0.8,1.1); "
    "gaussian_noise(0.02,12.75,0.5) | laplace_noise(0.02,12.75,0.5); "
    "gamma(0.7,1.3) | linear_contrast(0.6,1.4)",
    # BUILD.md, README, pipeline/augment.py docstring
    "add(-20,20)|multiply; gaussian_blur; sometimes(0.5, jpeg(60,80))",
    "add(-20,20)|multiply; gaussian_blur(0.5,1); sometimes(0.5, jpeg(60,80))",
    "mirror; zoom(0.6,1); default", "median_blur(5)", "average_blur(3,5)", "motion_blur(5,7)",
    "add(10)",
    # tests/test_train.py, test_data_service.py, test_inputs.py, benchmarks/gpu_check.py
    "add(-20,20)|multiply; gaussian_noise; sometimes(0.5, jpeg(60,80))",
    "sometimes(0.5, jpeg(60,80)); add(-15,15) | multiply(0.8,1.2); "
    "gaussian_noise(0.02,12.75,0.5); sometimes(0.5, rotate(-2,2))",
    "add(-15,15) | multiply(0.8,1.2); gaussian_noise(0.02,12.75,0.5)",
    "sometimes(0.5, jpeg(60,80)); add(-15,15); gaussian_blur(0.5,1)",
    "sometimes(0.5, jpeg(60,80)); add(-15,15) | multiply(0.8,1.2)",
    # tests/test_augment.py
    "zoom; mirror; gamma", "mirror; default", "add", "add(-5,5); median_blur(3)",
    "add(-15,15); gaussian_noise(3,8); motion_blur(3,5)",
    "gaussian_noise|laplace_noise|poisson_noise", "add|multiply|hue_saturation",
    "gamma|channel_gamma|sigmoid_contrast", "dropout(0.02)|pepper(0.02)|salt(0.03)",
    "dropout(0.02)|pepper(0.02)|salt(0.03); salt(0.01)",
    "gaussian_blur|average_blur(3,5)|motion_blur|median_blur(3); sometimes(0.5, median_blur(5))",
    "gaussian_noise|laplace_noise|poisson_noise; sometimes(0.5, gaussian_noise(3, 8, 0.5))",
    "sometimes(0.7, add(-20, 20)|multiply; rotate)",
    # the old parser's leniencies that stay: case, trailing ';', 'default()'
    "ADD(1,2); Default", "None", "add;", "sometimes(0.5, jpeg;)", "default()", "add(1,)",
    "add(+1.5e1, 2E1)", "add(-.5,.5)",
)


def describe(op):
    """A policy as plain data: class, salt, parameters; children recursively."""
    params = {k: v for k, v in sorted(vars(op).items()) if k not in ("ops", "salt")}
    out = {"class": type(op).__name__, "salt": op.salt, "params": json.loads(json.dumps(params))}
    if hasattr(op, "ops"):
        out["ops"] = [describe(child) for child in op.ops]
    return out


def load_expected():
    with open(os.path.join(HERE, "data", "augment_policy_specs.json"), encoding="utf-8") as f:
        return json.load(f)


def test_every_recorded_spec_parses_to_the_same_policy():
    expected = load_expected()
    assert set(FOUND_SPECS) <= set(expected) and len(expected) >= len(FOUND_SPECS) + 60
    for spec, want in expected.items():
        assert describe(augment.parse_policy(spec)) == want, spec


def test_recipe_policies_parse():
    for path in glob.glob(os.path.join(ROOT, "recipes", "*.flags")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith("--augment_policy="):
                    augment.parse_policy(line.strip().split("=", 1)[1])


def test_keyword_arguments_are_the_ops_parameter_names():
    positional = augment.parse_policy("frequency_blend(0.9,1.1,0.8,1.2,-1,2)")
    keywords = augment.parse_policy(
        "frequency_blend(mul_lo=0.9, mul_hi=1.1, con_lo=0.8, con_hi=1.2, exp_lo=-1, exp_hi=2)")
    assert describe(keywords) == describe(positional)
    mixed = augment.parse_policy("sometimes(0.5, gaussian_noise(1, 5, per_channel=0)); "
                                 "sigmoid_contrast(5, 8, cut_hi=0.7) | median_blur(k=5)")
    assert mixed.spec() == ("sometimes(0.5, gaussian_noise(1,5,0)); "
                            "sigmoid_contrast(5,8,0.3,0.7) | median_blur(5)")
    assert describe(augment.parse_policy("add(hi=20, lo=-20)")) == describe(
        augment.parse_policy("add(-20,20)"))


@pytest.mark.parametrize("spec,message", [
    ("add(x=1)", r"bad arguments for add: .*'x'.*parameters: lo, hi"),
    ("add(1, lo=2)", r"bad arguments for add: .*multiple values.*'lo'"),
    ("add(1,2,3)", r"bad arguments for add: too many positional"),
    ("add(a)", r"arguments of add must be numbers, got 'a'"),
    ("add(np.pi)", r"arguments of add must be numbers, got 'np.pi'"),
    ("add(abs(1))", r"arguments of add must be numbers, got 'abs\(1\)'"),
    ("add(*x)", r"arguments of add must be numbers, got '\*x'"),
    ("add(**x)", r"arguments of add must be numbers, got '\*\*x'"),
    ("add(1+2)", r"arguments of add must be numbers, got '1\+2'"),
    ("add(--1)", r"arguments of add must be numbers, got '--1'"),
    ("add(True)", r"arguments of add must be numbers, got 'true'"),
    ("jpeg(lo=60, hi=x)", r"arguments of jpeg must be numbers, got 'hi=x'"),
    ("sometimes(x, add)", r"sometimes\(p, steps\) needs a number p"),
    ("sometimes(0.5)", r"sometimes needs \(p, STEPS\)"),
    ("sometimes", r"sometimes needs \(p, STEPS\)"),
    ("sometimes(p=0.5, add)", r"bad syntax"),
    ("default(1)", r"'default' takes no arguments"),
    ("none(1)", r"'none' takes no arguments"),
    ("add or multiply", r"expected an op name, got 'or'"),
    ("add # comment", r"unexpected character '#'"),
    ("add(1 2)", r"bad syntax"),
    ("add.x", r"expected an op name, got 'add.x'"),
    ("add(1)(2)", r"expected an op name"),
    ("3", r"expected an op name, got '3'"),
])
def test_bad_arguments_name_the_op_and_the_bad_part(spec, message):
    with pytest.raises(ValueError, match=message):
        augment.parse_policy(spec)


def test_a_nested_sequence_round_trips():
    # spec() writes a nested Sequential in parentheses; it parses back to the
    # same policy (same seed paths).
    policy = augment.parse_policy("mirror; default")
    assert describe(augment.parse_policy(policy.spec())) == describe(policy)


def test_label_reading_ops_are_refused_where_no_labels_are_passed():
    policy = augment.parse_policy("add; sometimes(0.5, mirror | gamma); zoom")
    assert policy.reads_labels and not augment.parse_policy("default").reads_labels
    with pytest.raises(ValueError, match=r"mirror\(0.5\) reads the labels, which the test"):
        augment.refuse_label_readers(policy, "the test")
    augment.refuse_label_readers(augment.parse_policy("add; zoom"), "the test")
    # split_policy keeps mirror on the host, so the layer's device part passes.
    layer = augment.AugmentLayer("mirror; add")
    assert not layer._device_op.reads_labels
