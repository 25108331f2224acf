"""Planted bugs that the CI tests must catch: a short, repeatable mutation check.

    .venv/bin/python -m tests.mutation_check            # all of them
    .venv/bin/python -m tests.mutation_check M3 M5      # some
    .venv/bin/python -m tests.mutation_check --list

Each mutant is one or more exact text replacements in one library file and the
pytest node ids that must fail because of it. For each, the working tree
(tracked files plus untracked ones git does not ignore, so uncommitted work is
checked too) is copied to a temporary folder, the replacements are applied there
and pytest runs the named tests in that copy: the repository itself is never
modified. First a baseline run of all the named tests on the unmodified copy
must pass, or the catches below would mean nothing.

Results: CAUGHT (pytest exit 1: a test failed), MISSED (exit 0), ERROR (any
other exit: collection or usage error, timeout; not a catch), STALE (the old
text is no longer in the file exactly once: update the mutant with the code).
Exit status 0 only when every mutant is CAUGHT.

Run it before resolving work that touches a module listed here, and add a row
when a bug slips past the tests. The whole list took 9 minutes on 2 shared CPU
cores (load 5-6) with 19/19 caught; keep it near that: one mutant per test, the
cheapest parameter of a parametrized test. This file is not collected by pytest (its name
does not match test_*.py).
"""
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 900


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    what: str
    path: str             # relative to the repository root
    edits: tuple          # ((old text, new text), ...), each old text exactly once
    tests: tuple          # pytest node ids that must fail


MUTANTS = (
    Mutant("M1", "MobileNetV3 built without include_preprocessing (inputs not scaled)",
           "pipeline/model.py",
           (('kwargs["include_preprocessing"] = True',
             'kwargs["include_preprocessing"] = False'),),
           ("tests/test_model.py::test_input_scaling_matches_keras_application",)),
    Mutant("M2", "evaluate(): the fitted temperature never applied (scaled = probs)",
           "pipeline/evaluation.py",
           (("    scaled = apply_temperature(probs, temperature)\n",
             "    scaled = probs\n"),),
           ("tests/test_evaluation.py::"
            "test_evaluate_temperature_scaling_block_uses_the_fitted_temperature",)),
    Mutant("M3", "finish(): temperature inverted (1/T) in model_info.json and the export",
           "pipeline/outputs.py",
           (('model_info["temperature"] = scores["temperature"]',
             'model_info["temperature"] = 1 / scores["temperature"]'),
            ('_export(final, model_dir, config, scores["temperature"])',
             '_export(final, model_dir, config, 1 / scores["temperature"])')),
           ("tests/test_train.py::test_fitted_temperature_reaches_model_info_export_and_orient",)),
    Mutant("M3b", "finish(): temperature inverted (1/T) in the SavedModel export only",
           "pipeline/outputs.py",
           (('_export(final, model_dir, config, scores["temperature"])',
             '_export(final, model_dir, config, 1 / scores["temperature"])'),),
           ("tests/test_train.py::test_fitted_temperature_reaches_model_info_export_and_orient",)),
    Mutant("M4", "SaveBest: value <= best -> value >= best (keeps the worst epoch)",
           "pipeline/callbacks.py",
           (('if best is not None and value <= best["val_accuracy"]:',
             'if best is not None and value >= best["val_accuracy"]:'),),
           ("tests/test_train.py::test_kept_model_is_the_best_epoch_of_history",)),
    Mutant("M5", "reduced JPEG decoding off (_JPEG_RATIOS = (1, 1, 1, 1))",
           "pipeline/preprocess.py",
           (("_JPEG_RATIOS = (1, 2, 4, 8)", "_JPEG_RATIOS = (1, 1, 1, 1)"),),
           ("tests/test_inputs.py::test_jpeg_decoded_size_before_resizing",)),
    Mutant("M6", "the stage's learning rate 1000x too small (training barely moves)",
           "pipeline/trainer_models.py",
           (('optimizer=keras.optimizers.Adam(learning_rate=lr),',
             'optimizer=keras.optimizers.Adam(learning_rate=lr * 1e-3),'),),
           ("tests/test_train.py::test_training_learns_an_easy_orientation_task",)),
    Mutant("M7", "evaluate command: --num_bins not passed on to the library",
           "tools/evaluate.py",
           (("tta=_TTA.value, out_json=_OUT.value, num_bins=_NUM_BINS.value,\n",
             "tta=_TTA.value, out_json=_OUT.value,\n"),),
           ("tests/test_evaluation.py::test_evaluate_tool_flags_reach_the_library",)),
    Mutant("M8", "evaluate command: --tta ignored",
           "tools/evaluate.py",
           (("tta=_TTA.value, out_json", "tta=False, out_json"),),
           ("tests/test_evaluation.py::test_evaluate_tool_flags_reach_the_library",)),
    Mutant("M9", "--bn_momentum never reaches the model the trainer builds",
           "pipeline/trainer_models.py",
           (("weights=weights, head=config.head, dropout=config.dropout,\n"
             "                                 bn_momentum=config.bn_momentum)",
             "weights=weights, head=config.head, dropout=config.dropout)"),),
           ("tests/test_train.py::test_bn_momentum_reaches_every_backbone_batchnorm",)),
    Mutant("M10", "--early_stopping_patience stops but keeps the last epoch's weights",
           "pipeline/callbacks.py",
           (("restore_best_weights=True))", "restore_best_weights=False))"),),
           ("tests/test_train.py::"
            "test_early_stopping_stops_after_the_peak_and_restores_the_best_weights",)),
    Mutant("M11", "--reduce_lr_factor ignored (Keras' default 0.1)",
           "pipeline/callbacks.py",
           (("factor=config.reduce_lr_factor,", "factor=0.1,"),),
           ("tests/test_train.py::"
            "test_reduce_lr_on_plateau_multiplies_by_the_factor_down_to_min_lr",)),
    Mutant("M12", "--measure_steps only switches the measurement on (always 10 steps)",
           "pipeline/outputs.py",
           (("measure_throughput(config, steps=config.measure_steps)",
             "measure_throughput(config)"),),
           ("tests/test_train.py::test_measure_steps_writes_a_consistent_throughput_block",)),
    Mutant("M13", "--jit_compile ignored (compile() always gets 'auto')",
           "pipeline/trainer_models.py",
           (('"true": True, "false": False}', '"true": "auto", "false": "auto"}'),),
           ("tests/test_train.py::test_jit_compile_reaches_model_compile[false-False-False]",)),
    Mutant("M14", "--stage2_train_batchnorm ignored (frozen BatchNorm always trains)",
           "pipeline/train.py",
           (("train_batchnorm=s.train_batchnorm)", "train_batchnorm=True)"),),
           ("tests/test_train.py::"
            "test_stage2_train_batchnorm_decides_if_frozen_batchnorm_statistics_move[False]",)),
    Mutant("M15", "--validation_steps ignored (validation runs the whole split)",
           "pipeline/train.py",
           (("self.val_steps = config.validation_steps or (", "self.val_steps = 0 or ("),),
           ("tests/test_train.py::test_validation_steps_is_the_number_of_val_batches",)),
    Mutant("M16", "make_records: the val comparison inverted (val share 1 - val_fraction)",
           "pipeline/splits.py",
           (('"val" if _split_hash(members, kept, keys) < val_fraction else "train"',
             '"val" if _split_hash(members, kept, keys) > val_fraction else "train"'),),
           ("tests/test_records.py::test_val_share_is_near_val_fraction",)),
    Mutant("M17", "train command: --bn_momentum not read into the TrainConfig",
           "tools/__init__.py",
           (("        if value is None:\n            continue",
             "        if value is None or f.name == 'bn_momentum':\n            continue"),),
           ("tests/test_train.py::"
            "test_tool_passes_the_hygiene_and_speed_flags_into_the_config",)),
    Mutant("M18", "multi-worker: BatchNorm statistics no longer averaged across workers",
           "pipeline/callbacks.py",
           (("cluster.average_non_trainable_callback(train_model, strategy),",
             "keras.callbacks.Callback(),"),),
           ("tests/test_multi_worker.py::test_train_tool_multi_worker_two_workers_on_loopback",)),
)


def copy_worktree(dest: str) -> None:
    """Tracked + untracked-not-ignored files of the repository into `dest`.

    The package is installed in editable mode from this repository's src/
    (src/upright/pipeline is a link to pipeline/); a link upright -> src/upright
    at the copy's root makes `import upright.pipeline` find the copy's files
    first (the copy's root is first on sys.path when pytest runs there). The
    repository's links are copied as links.
    """
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=REPO, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = os.path.join(REPO, rel)
        if os.path.islink(src):       # src/upright/pipeline -> ../../pipeline
            os.makedirs(os.path.dirname(os.path.join(dest, rel)) or dest, exist_ok=True)
            os.symlink(os.readlink(src), os.path.join(dest, rel))
            continue
        if not os.path.isfile(src):   # deleted but still in the index
            continue
        os.makedirs(os.path.dirname(os.path.join(dest, rel)) or dest, exist_ok=True)
        shutil.copy2(src, os.path.join(dest, rel))
    os.symlink(os.path.join("src", "upright"), os.path.join(dest, "upright"))


def check_imports_from(copy: str) -> None:
    """Refuses to go on if `upright.pipeline` would not be the copy's own files."""
    out = subprocess.run([sys.executable, "-c",
                          "import upright.pipeline.model as m; print(m.__file__)"],
                         cwd=copy, capture_output=True, text=True, timeout=120)
    path = os.path.realpath(out.stdout.strip())
    if not path.startswith(os.path.realpath(copy) + os.sep):
        sys.exit(f"mutation_check: upright.pipeline imports from {path!r}, not the copy "
                 f"{copy}: a mutant there would not be tested\n{out.stderr[-2000:]}")


def apply(copy: str, mutant: Mutant) -> str:
    """Applies the edits in the copy; '' on success, else why the mutant is stale."""
    path = os.path.join(copy, mutant.path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    for old, new in mutant.edits:
        if text.count(old) != 1:
            return f"{old!r} occurs {text.count(old)} times in {mutant.path}"
        text = text.replace(old, new)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return ""


def run_pytest(copy: str, tests) -> tuple:
    """(pytest exit code or 'timeout', its last summary line, seconds)."""
    start = time.monotonic()
    # Its own pytest temp root: /tmp/pytest-of-<user> is shared by every pytest
    # session of the user, and each one prunes the others' old folders.
    temproot = copy.rstrip(os.sep) + "-pytest-tmp"   # beside the copy, not inside it
    os.makedirs(temproot, exist_ok=True)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTEST_DEBUG_TEMPROOT=temproot)
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", *tests],
                              cwd=copy, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return "timeout", "", time.monotonic() - start
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    failed = [line for line in lines if line.startswith("FAILED") or line.startswith("ERROR")]
    summary = (failed[:1] + lines[-1:]) if lines else [proc.stderr.strip()[-300:]]
    return proc.returncode, " | ".join(summary), time.monotonic() - start


def main(argv) -> int:
    if "--list" in argv:
        for m in MUTANTS:
            print(f"{m.name:4} {m.path:24} {m.what}\n     must fail: {', '.join(m.tests)}")
        return 0
    chosen = [m for m in MUTANTS if not argv or m.name in argv]
    unknown = set(argv) - {m.name for m in MUTANTS}
    if unknown or not chosen:
        print(f"unknown mutant(s) {sorted(unknown)}; known: {[m.name for m in MUTANTS]}")
        return 2
    results = []
    with tempfile.TemporaryDirectory(prefix="upright-mutants-") as root:
        base = os.path.join(root, "baseline")
        copy_worktree(base)
        check_imports_from(base)
        all_tests = sorted({t for m in chosen for t in m.tests})
        code, summary, seconds = run_pytest(base, all_tests)
        print(f"baseline ({len(all_tests)} node ids): exit {code} in {seconds:.0f} s: {summary}",
              flush=True)
        if code != 0:
            print("BASELINE FAILS: fix the tests before judging mutants")
            return 1
        for m in chosen:
            copy = os.path.join(root, m.name)
            shutil.copytree(base, copy, symlinks=True)
            stale = apply(copy, m)
            if stale:
                verdict, summary, seconds = "STALE", stale, 0.0
            else:
                code, summary, seconds = run_pytest(copy, m.tests)
                verdict = {0: "MISSED", 1: "CAUGHT"}.get(code, "ERROR")
                if verdict == "ERROR":
                    summary = f"pytest exit {code}: {summary}"
            shutil.rmtree(copy, ignore_errors=True)
            results.append((m, verdict))
            print(f"{m.name:4} {verdict:7} {seconds:5.0f} s  {m.what}\n"
                  f"     {summary}", flush=True)
    bad = [m.name for m, verdict in results if verdict != "CAUGHT"]
    print(f"{len(results) - len(bad)}/{len(results)} caught"
          + (f"; not caught: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
