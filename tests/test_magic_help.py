"""Every magic is declared with IPython's ``magic_arguments``: generated help, our errors.

``%%scatter?``, ``%%pmap?``, ``%%stage?``, ``%pipeline?`` and ``%nbp?`` list the options each magic
takes (the shared ``--engines``, ``--no-dashboard`` and ``--transport`` groups included), and a bad
line raises nbparallel's UsageError, never IPython's or SystemExit. None of this needs a cluster:
the lines are refused while parsing, before anything looks at the notebook or the pool.
"""

from __future__ import annotations

import pytest
from IPython.core.error import UsageError as IPythonUsageError

from nbparallel import errors
from nbparallel.dataplane import transport
from nbparallel.magics import NbparallelMagics, _parse

HELP = {
    "scatter": ("%%scatter [", "--broadcast", "--gather", "--reduce", "--axis", "--halo", "--keep",
                "--engines", "--transport", "--no-dashboard", "names to split across engines"),
    "pmap": ("%%pmap TARGET in ITERABLE -> NAME", "--chunksize", "--unordered", "--retries",
             "--engines", "--no-progress", "--transport", "--no-dashboard"),
    "stage": ("%%stage [--engine K] [--engines A,B] name", "--engine", "--engines"),
    "pipeline": ("%pipeline {run,train,schedule,show,clear}", "%pipeline run --input NAME",
                 "%pipeline train", "%pipeline schedule --stages P", "--schedule",
                 "--microbatches", "--steps", "--target", "--out", "--virtual", "--no-dashboard",
                 "--data-parallel", "--precision", "--checkpoint-every"),
    "nbp": ("%nbp {start,connect,status,stop,monitor,restart,trace,dashboard}", "%nbp start",
            "-n N", "--gpus", "%nbp connect", "--profile", "--cluster-id", "%nbp trace {save} file",
            "%nbp dashboard {on,off}"),
}


@pytest.fixture(scope="module")
def magics():
    return NbparallelMagics(shell=None)


@pytest.mark.parametrize("name", sorted(HELP))
def test_the_generated_help_lists_every_option(name):
    doc = getattr(NbparallelMagics, name).__doc__
    for text in HELP[name]:
        assert text in doc, f"{text!r} is not in the help of {name}:\n{doc}"
    parser = getattr(NbparallelMagics, name).parser
    commands = getattr(parser, "nbp_commands", None)
    parsers = [parser] + (list(commands.choices.values()) if commands else [])
    for p in parsers:  # every option and positional says what it is for
        for action in p._actions:
            assert action.help, f"{p.prog}: {action.dest} has no help"


def test_pinfo_shows_the_generated_help(capsys):
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    ip.register_magics(NbparallelMagics)
    for name, magic in [("pmap", "%%pmap"), ("stage", "%%stage"), ("pipeline", "%pipeline"),
                        ("nbp", "%nbp"), ("scatter", "%%scatter")]:
        ip.run_line_magic("pinfo", magic)
        shown = capsys.readouterr().out
        for text in HELP[name]:
            assert text in shown, f"{magic}? does not show {text!r}:\n{shown}"


def test_transport_choices_come_from_the_transport_names():
    def choices(name):
        return next(a.choices for a in getattr(NbparallelMagics, name).parser._actions
                    if a.dest == "transport")

    assert tuple(choices("scatter")) == transport.OPTIONS
    # a load-balanced chunk goes to an engine not known in advance: it cannot be sent directly
    assert tuple(choices("pmap")) == tuple(o for o in transport.OPTIONS if o != transport.DIRECT)


BAD = [
    ("scatter", "a --gather c --bogus", "c = a", r"%%scatter: unrecognized arguments: --bogus"),
    ("scatter", "a --transport carrier", "c = a", "argument --transport: invalid choice: 'carrier'"),
    ("scatter", "a --axis 1.5", "c = a",
     "%%scatter: argument --axis: takes a number, or the name of an xarray value's dimension; "
     "not '1.5'"),
    ("scatter", 'a "b', "c = a", "%%scatter: cannot read 'a \"b': No closing quotation"),
    ("pmap", "x in range(3) -> r --bogus", "x", "%%pmap: unrecognized arguments: --bogus"),
    ("pmap", "x in range(3) -> r --transport direct", "x",
     "argument --transport: invalid choice: 'direct' (choose from 'auto', 'shm', 'ipp')"),
    ("pmap", "x in range(3) -> r --chunksize big", "x", "argument --chunksize: invalid int value"),
    ("pmap", "x in range(3) -> r 'oops", "x", "%%pmap: cannot read \"r 'oops\""),
    ("stage", "s --bogus", "pass", "%%stage: unrecognized arguments: --bogus"),
    ("stage", "", "pass", "%%stage: the following arguments are required: name"),
    ("stage", "s --engine x", "pass", "%%stage: argument --engine: invalid int value: 'x'"),
    ("stage", "s\\", "pass", "%%stage: cannot read 's\\\\': No escaped character"),
    ("pipeline", "run --input x --out y --bogus", None,
     "%pipeline: unrecognized arguments: --bogus"),
    ("pipeline", "", None, "%pipeline: the following arguments are required: command"),
    ("pipeline", "fly", None, "%pipeline: argument command: invalid choice: 'fly'"),
    ("pipeline", "run --out y", None,
     "%pipeline run: the following arguments are required: --input"),
    ("pipeline", "train --input x --out y", None,
     "%pipeline train: the following arguments are required: --target"),
    ("pipeline", "schedule --stages 2 --microbatches 4 --steps 3", None,
     "%pipeline: unrecognized arguments: --steps 3"),
    ("pipeline", "run --input 'x", None, "%pipeline: cannot read"),
    ("nbp", "start --bogus", None, "%nbp: unrecognized arguments: --bogus"),
    ("nbp", "", None, "%nbp: the following arguments are required: command"),
    ("nbp", "start -n abc", None, "%nbp start: argument -n: invalid int value: 'abc'"),
    ("nbp", "connect --cluster-id", None, "%nbp connect: argument --cluster-id: expected one"),
    ("nbp", "trace", None, "%nbp trace: the following arguments are required: action, file"),
    ("nbp", "dashboard maybe", None, "%nbp dashboard: argument state: invalid choice: 'maybe'"),
    ("nbp", "stop now", None, "%nbp: unrecognized arguments: now"),
    ("nbp", "start -h", None, "%nbp: unrecognized arguments: -h"),
    ("nbp", 'trace save "t.json', None, "%nbp: cannot read"),
]


@pytest.mark.parametrize("name, line, cell, excerpt", BAD, ids=[f"{b[0]} {b[1]}" for b in BAD])
def test_a_bad_line_raises_our_usage_error(magics, name, line, cell, excerpt):
    magic = getattr(magics, name)
    with pytest.raises(BaseException) as info:
        magic(line) if cell is None else magic(line, cell)
    exc = info.value
    assert type(exc) is errors.UsageError, f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
    assert not isinstance(exc, IPythonUsageError)
    message = str(exc)
    assert excerpt in message, message
    assert "\n" not in message, "one paragraph"
    escape = "%%" if cell is not None else "%"
    assert message.endswith(f"`{escape}{name}?` lists the options."), message  # the hint


def test_good_lines_parse_to_the_same_defaults_as_before(magics):
    args = _parse(magics.pmap, "r")
    assert vars(args) == dict(out="r", chunksize=None, unordered=False, retries=0, engines=None,
                              no_progress=False, no_dashboard=False, transport="auto")
    args = _parse(magics.pmap, "r --chunksize 4 --unordered --retries 2 --engines 0-1 "
                               "--no-progress --no-dashboard --transport shm")
    assert vars(args) == dict(out="r", chunksize=4, unordered=True, retries=2, engines="0-1",
                              no_progress=True, no_dashboard=True, transport="shm")
    assert vars(_parse(magics.stage, "l1")) == dict(name="l1", engine=None, engines=None)
    assert vars(_parse(magics.stage, "l1 --engine 2")) == dict(name="l1", engine=2, engines=None)
    assert vars(_parse(magics.stage, "l1 --engines 0,1")) == dict(name="l1", engine=None,
                                                                  engines="0,1")
    assert vars(_parse(magics.pipeline, "run --input x --out y")) == dict(
        command="run", input="x", microbatches=1, schedule="gpipe", out="y", no_dashboard=False)
    assert vars(_parse(magics.pipeline, "train --input x --target t --out y")) == dict(
        command="train", input="x", target="t", microbatches=1, schedule="1f1b", steps=1,
        out="y", no_dashboard=False, max_stash=None, data_parallel=1, precision="fp32",
        checkpoint_every=None)
    assert vars(_parse(magics.pipeline, "schedule --stages 2 --microbatches 4")) == dict(
        command="schedule", stages=2, microbatches=4, schedule="1f1b", virtual=1, costs=None,
        compare=False)
    assert vars(_parse(magics.pipeline, "show")) == dict(command="show", data_parallel=1)
    assert vars(_parse(magics.nbp, "monitor")) == dict(command="monitor", side=False)
    assert vars(_parse(magics.nbp, "monitor --side")) == dict(command="monitor", side=True)
    assert vars(_parse(magics.nbp, "start")) == dict(command="start", n=None, gpus=None,
                                                     no_respawn=False)
    assert vars(_parse(magics.nbp, "start -n -1 --gpus 0,1")) == dict(command="start", n=-1,
                                                                      gpus="0,1", no_respawn=False)
    assert vars(_parse(magics.nbp, "connect --profile p --cluster-id c")) == dict(
        command="connect", profile="p", cluster_id="c", gpus=None, wait=None, n=None)
    assert vars(_parse(magics.nbp, "dashboard off")) == dict(command="dashboard", state="off")
    # words split as a shell does: quotes group and are removed
    assert _parse(magics.nbp, 'trace save "my trace.json"').file == "my trace.json"
    args = _parse(magics.scatter, "a b --broadcast w --gather c --reduce s=sum")
    assert (args.names, args.broadcast, args.gather, args.reduce) == (["a", "b"], ["w"], ["c"],
                                                                       ["s=sum"])
    assert (args.axis, args.halo, args.keep, args.transport, args.no_dashboard, args.engines) == (
        0, 0, [], "auto", False, None)
