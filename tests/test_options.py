"""One option surface: the CLI flags, the TOML keys, --help, model.json and the estimators'
keywords all come from the option records' fields (ntk_scale.options). No Ray, no subprocess."""

import argparse
import dataclasses
import inspect
import json

import numpy as np
import pytest
from sklearn.base import BaseEstimator, RegressorMixin, clone
from sklearn.utils import estimator_checks as checks

from ntk_scale import options as opts
from ntk_scale.cli import build_parser, main
from ntk_scale.config import load_config, schema
from ntk_scale.ingest import IngestOptions
from ntk_scale.kernels.validate import DTYPES
from ntk_scale.options import (
    GramOptions,
    RunOptions,
    SolveOptions,
    add_arguments,
    estimator_init,
    option,
    pick,
    toml_schema,
)

BASE = (
    '[data]\nx_train = "x.npy"\ny_train = "y.npy"\n[store]\npath = "g.zarr"\n[output]\ndir = "o"\n'
)


def _config(tmp_path, extra=""):
    (tmp_path / "c.toml").write_text(BASE + extra)
    return str(tmp_path / "c.toml")


def _subparser(command):
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def _dests(parser):
    return {a.dest for a in parser._actions}


# -- every field reaches every face -------------------------------------------------------------
@pytest.mark.parametrize("record", [RunOptions, GramOptions, SolveOptions])
def test_every_field_is_a_config_key(record):
    """The old hand-written schema lacked seven RunOptions fields; now none can be missing."""
    keys = {(o.section, o.name) for section in schema().values() for o in section.values()
            if o.record is record}  # fmt: skip
    assert {name for _, name in keys} == {f.name for f in dataclasses.fields(record)}


@pytest.mark.parametrize(
    "command, records",
    [
        ("gram", [GramOptions, RunOptions]),
        ("solve", [SolveOptions, RunOptions]),
        ("predict", [RunOptions]),
        ("verify", [RunOptions]),
        ("ingest", [IngestOptions]),
    ],
)
def test_every_field_is_a_flag_of_its_commands(command, records):
    dests = _dests(_subparser(command))
    for record in records:
        missing = {f.name for f in dataclasses.fields(record)} - dests
        assert not missing, f"{command} lacks flags for {record.__name__}.{sorted(missing)}"


def test_the_existing_flag_names_are_kept():
    flags = {s for a in _subparser("solve")._actions for s in a.option_strings}
    flags |= {s for a in _subparser("gram")._actions for s in a.option_strings}
    flags |= {s for a in _subparser("ingest")._actions for s in a.option_strings}
    old = ("--ridge --cv --holdout --ridge-absolute --preconditioner --rank --tol --max-iter "
           "--operator --checkpoint-every --pivot-block --workers --address --no-progress "
           "--accelerator --allow-cpu --gpu-wait --kind --dtype --tile --overwrite --features "
           "--target --categorical --fill --test-fraction --test --train-rows --test-rows "
           "--no-standardize-target --block --seed").split()  # fmt: skip
    assert set(old) <= flags, sorted(set(old) - flags)


def test_cli_defaults_are_the_records_defaults():
    a = build_parser().parse_args(["solve", "--store", "s", "--y", "y", "--model-dir", "m"])
    assert pick(SolveOptions, a) == SolveOptions() and pick(RunOptions, a) == RunOptions()
    a = build_parser().parse_args(["gram", "--x", "x", "--store", "s"])
    assert pick(GramOptions, a) == GramOptions()


def test_cli_flags_parse_to_the_record():
    argv = ["solve", "--store", "s", "--y", "y", "--model-dir", "m", "--ridge", "1e-6,1e-3",
            "--ridge-absolute", "--cv", "4", "--preconditioner", "jacobi", "--rank", "7",
            "--tol", "1e-9", "--max-iter", "33", "--operator", "dense", "--checkpoint-every",
            "5", "--seed", "11", "--pivot-block", "8", "--memory-budget-bytes", "1000",
            "--workers", "3", "--address", "ray://h:1", "--no-progress", "--accelerator", "L4",
            "--allow-cpu", "--gpu-wait", "12", "--stall-seconds", "60"]  # fmt: skip
    a = build_parser().parse_args(argv)
    assert pick(SolveOptions, a) == SolveOptions(
        ridge=(1e-6, 1e-3), ridge_absolute=True, cv=4, preconditioner="jacobi", rank=7,
        tol=1e-9, max_iter=33, operator="dense", checkpoint_every=5, seed=11, pivot_block=8,
        memory_budget_bytes=1000,
    )  # fmt: skip
    assert pick(RunOptions, a) == RunOptions(workers=3, address="ray://h:1", progress=False,
                                             accelerator="L4", allow_cpu=True, gpu_wait_s=12.0,
                                             stall_seconds=60.0)  # fmt: skip


def test_ingest_flags_parse_to_ingest_options():
    a = build_parser().parse_args(["ingest", "t.csv", "--out", "o", "--features", "a, b",
                                   "--categorical", "b", "--test", "u.csv",
                                   "--no-standardize-target", "--block", "64"])  # fmt: skip
    assert pick(IngestOptions, a) == IngestOptions(features=("a", "b"), categorical=("b",),
                                                   test_source="u.csv",
                                                   standardize_target=False, block=64)  # fmt: skip


def test_config_reads_every_run_key(tmp_path):
    run = ('[run]\nworkers = 2\naddress = "ray://h:1"\nthreads_per_worker = 1\n'
           "tasks_per_worker = 4\nmax_retries = 1\nmax_task_deaths = 2\n"
           "placement_timeout_s = 30\nwait_seconds = 0.5\nstall_seconds = 60\n"
           "call_timeout_s = 99\nprogress = false\naccelerator = \"cpu\"\nallow_cpu = true\n"
           "gpu_wait_s = 1\n")  # fmt: skip
    cfg = load_config(_config(tmp_path, run + "[solver]\nridge = [1e-6, 1e-4]\ncv = 3\n"))
    assert cfg.run == RunOptions(workers=2, address="ray://h:1", threads_per_worker=1,
                                 tasks_per_worker=4, max_retries=1, max_task_deaths=2,
                                 placement_timeout_s=30, wait_seconds=0.5, stall_seconds=60,
                                 call_timeout_s=99, progress=False, accelerator="cpu",
                                 allow_cpu=True, gpu_wait_s=1)  # fmt: skip
    assert cfg.solver == SolveOptions(ridge=(1e-6, 1e-4), cv=3)
    assert cfg.gram == GramOptions()


def test_config_kind_and_store_keys_make_one_gram_record(tmp_path):
    body = BASE.replace('path = "g.zarr"', 'path = "g.zarr"\ntile = 64\ndtype = "float64"')
    (tmp_path / "c.toml").write_text(body + '[kernel]\nkind = "nngp"\ndepth = 1\n')
    cfg = load_config(str(tmp_path / "c.toml"))
    assert cfg.gram == GramOptions(kind="nngp", dtype="float64", tile=64)
    assert cfg.kernel.depth == 1


def test_empty_string_is_the_default_none(tmp_path):
    assert load_config(_config(tmp_path, '[run]\naddress = ""\n')).run.address is None


@pytest.mark.parametrize(
    "extra, fragments",
    [
        ("[run]\nworkerz = 2\n", ["unknown key run.workerz", "'workers'", "'stall_seconds'"]),
        ("[solvers]\n", ["unknown section [solvers]", "'solver'", "'run'"]),
        ('[run]\nworkers = "2"\n', ["run.workers='2' has the wrong type", "expected an integer"]),
        ("[run]\nallow_cpu = 1\n", ["run.allow_cpu=1 has the wrong type", "true or false"]),
        (
            "[solver]\ntol = true\n",
            ["solver.tol=True has the wrong type", "a number", "tol = 1e-06"],
        ),
        ('[solver]\nridge = "big"\n', ["ridge='big' is not a number", "or 'auto'"]),
        ('[store]\ndtype = "float16"\n', ["[store]", "dtype='float16'", "float32, float64"]),
        ('[kernel]\nkind = "gp"\n', ["[kernel]", "kind='gp'", "ntk, nngp"]),
        ('[output]\ntask = "rank"\n', ["[output]", "task='rank'", "regression"]),
    ],
)
def test_bad_config_names_the_key_and_the_fix(tmp_path, extra, fragments):
    body = BASE + extra
    if extra.startswith(("[store]", "[output]")):  # merge into the existing section
        section, line = extra.split("\n", 1)
        body = BASE.replace(section + "\n", section + "\n" + line)
    (tmp_path / "c.toml").write_text(body)
    with pytest.raises(ValueError) as err:
        load_config(str(tmp_path / "c.toml"))
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)


def test_missing_required_key(tmp_path):
    (tmp_path / "c.toml").write_text('[data]\nx_train = "x.npy"\ny_train = "y.npy"\n'
                                     '[output]\ndir = "o"\n')  # fmt: skip
    with pytest.raises(ValueError, match="missing required key store.path"):
        load_config(str(tmp_path / "c.toml"))


def test_help_text_comes_from_the_field(capsys):
    with pytest.raises(SystemExit):
        main(["solve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for opt in opts.options(SolveOptions):
        assert opt.flag in out
    assert "RPCholesky pivots per round (>1: accelerated, fewer passes) (default 1)" in out
    assert "--memory-budget-bytes BYTES" in out


def test_fit_help_lists_every_config_key(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    for section, keys in schema().items():
        assert f"[{section}]" in out
        for key in keys:
            assert f"\n{key} = " in out, f"[{section}] {key}"
    assert "stall_seconds = 900.0  # no finished task in this many seconds ends the run" in out
    assert "path = <a string>  # the Gram store" in out and "(required)" in out


# -- a new option is one field ------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Widgets:
    """A scratch record: what adding an option takes (one field)."""

    max_widgets: int = option(7, "widgets at most", section="extra")
    shape: str = option("round", "widget shape", section="extra", choices=("round", "square"))
    hidden: bool = option(False, "not on the command line", section="extra", flag=None,
                          keyword=False)  # fmt: skip

    def __post_init__(self):
        opts.check_choices(self)


def test_a_new_option_reaches_every_face():
    parser = argparse.ArgumentParser()
    add_arguments(parser, Widgets)
    a = parser.parse_args(["--max-widgets", "9", "--shape", "square"])
    assert pick(Widgets, a) == Widgets(max_widgets=9, shape="square")
    assert "hidden" not in _dests(parser)
    assert set(toml_schema(Widgets)["extra"]) == {"max_widgets", "shape", "hidden"}
    values = opts.check_toml({"extra": {"max_widgets": 3}}, toml_schema(Widgets), "w.toml")
    assert opts.from_toml(Widgets, values, "w.toml") == Widgets(max_widgets=3)
    init = estimator_init(Widgets)
    assert list(inspect.signature(init).parameters) == ["self", "max_widgets", "shape"]
    with pytest.raises(ValueError, match="shape='oval' is not supported; use one of round"):
        Widgets(shape="oval")
    with pytest.raises(SystemExit):
        parser.parse_args(["--shape", "oval"])


def test_a_choice_is_one_edit_of_the_field():
    """GramOptions.dtype's choices are the field's: argparse offers them and the record
    checks them ("auto" was added by an edit of that field alone)."""
    action = next(a for a in _subparser("gram")._actions if a.dest == "dtype")
    assert (
        tuple(action.choices)
        == ("auto", *DTYPES)
        == next(o.choices for o in opts.options(GramOptions) if o.name == "dtype")
    )
    assert action.default == GramOptions().dtype == "auto"
    with pytest.raises(ValueError, match="dtype='float16' is not supported; use one of auto"):
        GramOptions(dtype="float16")


def test_an_annotation_that_does_not_resolve_takes_any_value():
    """A kernel spec's field annotated with a name only type checkers import must not break
    the schema (nor the CLI, whose fit --help lists it): the record checks the value."""

    @dataclasses.dataclass(frozen=True)
    class Spec:
        depth: int = 3
        shape: "NotImportedHere" = None  # noqa: F821

    sch = toml_schema((Spec, "kernel"))
    values = opts.check_toml({"kernel": {"shape": [8, 8], "depth": 2}}, sch, "k.toml")
    assert opts.from_toml(Spec, values, "k.toml", section="kernel") == Spec(2, [8, 8])
    with pytest.raises(ValueError, match="kernel.depth='2' has the wrong type; expected an int"):
        opts.check_toml({"kernel": {"depth": "2"}}, sch, "k.toml")


def test_one_key_declared_twice_is_refused():
    @dataclasses.dataclass(frozen=True)
    class Clash:
        max_widgets: int = option(1, "again", section="extra")

    with pytest.raises(TypeError, match=r"\[extra\] max_widgets is both Widgets.max_widgets"):
        toml_schema(Widgets, Clash)


def test_to_json_records_the_fields():
    got = opts.to_json(SolveOptions(ridge=[1e-3, 1e-2], rank=9))
    assert json.loads(json.dumps(got)) == got
    assert got == {"ridge": [1e-3, 1e-2], "ridge_absolute": False, "cv": None, "holdout": None,
                   "preconditioner": "rpcholesky", "rank": 9, "tol": 1e-6, "max_iter": None,
                   "operator": "stored", "checkpoint_every": 10, "seed": 0, "pivot_block": 1,
                   "memory_budget_bytes": 2 * 2**30, "method": "exact", "centers": 10_000,
                   "center_selection": "rpcholesky", "knm": "auto",
                   "warm_start": "none", "posterior": "auto"}  # fmt: skip
    assert "progress" not in opts.to_json(RunOptions()) and "overwrite" not in opts.to_json(
        GramOptions()
    )


def test_no_second_schema_and_no_restated_defaults():
    import ntk_scale.config as config
    from ntk_scale.linalg import DenseOperator, nystrom, solve_pcg
    from ntk_scale.linalg.preconditioners import rpcholesky
    from ntk_scale.solve import make_folds

    assert not hasattr(config, "_SECTIONS") and not hasattr(opts, "from_mapping")

    def default_of(fn, name):
        return inspect.signature(fn).parameters[name].default

    # the literals these functions used to repeat, and the records' values they must equal
    assert default_of(solve_pcg, "tol") == SolveOptions().tol == 1e-6
    assert default_of(nystrom, "block") == default_of(rpcholesky, "block") == 1
    assert default_of(nystrom, "seed") == default_of(make_folds, "seed") == SolveOptions().seed
    assert default_of(DenseOperator, "block") == GramOptions().tile == 2048


# -- the estimators' __init__ -------------------------------------------------------------------
class Dummy(RegressorMixin, BaseEstimator):
    """A stand-in estimator over the same records (NTKRegressor is wired by the lead)."""

    __init__ = estimator_init(GramOptions, SolveOptions, RunOptions, before={"kernel": None},
                              after={"workdir": None}, defaults={"progress": False})  # fmt: skip

    def fit(self, X, y):
        self.options_ = pick(GramOptions, self), pick(SolveOptions, self), pick(RunOptions, self)
        self.mean_ = float(np.mean(y))
        return self

    def predict(self, X):
        return np.full(len(X), self.mean_)


class DummyCV(Dummy):
    __init__ = estimator_init(GramOptions, SolveOptions, RunOptions,
                              before={"kernel": None, "ridges": (1e-6, 1e-2), "cv": 5},
                              after={"workdir": None}, defaults={"progress": False},
                              exclude=("ridge",))  # fmt: skip


def test_estimator_init_signature_holds_the_hand_written_keywords():
    """Oracle: today's hand-written NTKRegressor / NTKRegressorCV signatures. Every keyword
    they have is generated, with the same default (more options may be generated)."""
    from ntk_scale.estimator import NTKRegressor, NTKRegressorCV

    for generated, written in ((Dummy, NTKRegressor), (DummyCV, NTKRegressorCV)):
        gen = inspect.signature(generated.__init__).parameters
        old = inspect.signature(written.__init__).parameters
        assert list(old)[:2] == list(gen)[:2]  # self, kernel: positional use still works
        for name, p in old.items():
            assert name in gen, name
            assert gen[name].default == p.default or name == "ridges", name
        assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in gen.values())
    assert "ridge" not in inspect.signature(DummyCV.__init__).parameters


def test_estimator_init_stores_arguments_unchanged_and_clones():
    kernel, ridge = object(), [1e-3, 1e-2]
    est = Dummy(kernel, ridge=ridge, tile=64, workers=2)
    assert est.kernel is kernel and est.ridge is ridge and est.tile == 64
    params = est.get_params()
    assert params["progress"] is False and params["workdir"] is None
    assert params["pivot_block"] == 1  # a field no hand-written signature listed
    twin = clone(est)
    assert twin.get_params()["ridge"] == ridge and twin.get_params()["tile"] == 64
    fitted = est.fit(np.zeros((3, 2)), np.arange(3.0))
    assert fitted.options_[0] == GramOptions(tile=64)
    assert fitted.options_[2] == RunOptions(workers=2, progress=False)


@pytest.mark.parametrize(
    "check",
    [
        checks.check_parameters_default_constructible,
        checks.check_get_params_invariance,
        checks.check_set_params,
        checks.check_no_attributes_set_in_init,
        checks.check_do_not_raise_errors_in_init_or_set_params,
        checks.check_dont_overwrite_parameters,
        checks.check_estimators_overwrite_params,
    ],
    ids=lambda c: c.__name__,
)
@pytest.mark.parametrize("cls", [Dummy, DummyCV])
def test_estimator_init_passes_sklearn_parameter_checks(cls, check):
    check(cls.__name__, cls())


def test_estimator_init_refuses_what_sklearn_would_not_take():
    with pytest.raises(TypeError, match="given twice"):
        estimator_init(GramOptions, before={"kind": "ntk"})
    with pytest.raises(TypeError, match="not a parameter"):
        estimator_init(GramOptions, defaults={"nope": 1})
    with pytest.raises(TypeError, match="has no default"):
        estimator_init(IngestOptions)


# -- exit codes ---------------------------------------------------------------------------------
def test_a_solver_error_exits_1_not_2(monkeypatch, capsys):
    """A numerical failure (a real SolverError from PCG on an indefinite matrix) is a failure,
    not bad usage, although SolverError is still a ValueError subclass today."""
    from ntk_scale import cli
    from ntk_scale.linalg import DenseOperator, SolverError, solve_pcg

    def indefinite(*args, **kwargs):
        return solve_pcg(DenseOperator(-np.eye(4)), np.ones((4, 1)), 0.0)

    with pytest.raises(SolverError):
        indefinite()
    monkeypatch.setattr(cli, "plan_gram", indefinite)
    assert main(["plan", "--n", "10", "--d", "3", "--no-measure"]) == 1
    err = capsys.readouterr().err
    assert "ntk-scale plan: failed:" in err and "curvature" in err, err
    monkeypatch.undo()  # and bad usage is still 2
    assert main(["plan", "--n", "0", "--d", "3", "--no-measure"]) == 2
