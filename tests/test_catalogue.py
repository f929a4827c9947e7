"""The bad-input catalogue: every row of docs/errors.md, run for real, and the table kept honest.

Each case runs one magic with bad input on the session pool and checks:

* the exception is exactly the class the table says, and its message matches the case's
  pattern and contains the table's message excerpt (so the documentation cannot drift);
* no notebook variable was added, removed or rebound, and the pipeline's stages are the same;
* when the table says "nothing sent", no message went to any engine (ipyparallel's history
  did not grow): the input was refused in the notebook;
* the session's current pool is still current.

A last test checks that the table and the cases list the same ids. Cases marked ``xfail`` are
findings whose fix belongs in a module this test does not own (magics.py, pool.py); the table
documents the message the fix gives, and ``strict`` makes the test fail once the fix lands, so
the marker gets removed.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import nbparallel
from nbparallel import errors
from nbparallel.pipeline.schedule import ScheduleError

pytestmark = pytest.mark.cluster

DOC = Path(__file__).resolve().parent.parent / "docs" / "errors.md"

CLASSES = {cls.__name__: cls for cls in (errors.UsageError, errors.PartitionError, errors.PoolError,
                                         errors.RemoteError, errors.PmapError, ScheduleError)}


@dataclass(frozen=True)
class Case:
    id: str
    magic: str  # "%%scatter", "%pipeline", ...
    line: str
    cell: str | None  # None: a line magic
    error: str  # class name, a key of CLASSES
    pattern: str  # regex searched in the message
    sent: bool = False  # whether the input is only found wrong after engines ran something
    stages: str = "none"  # pipeline stages defined before the case (see STAGES)
    fix: str = ""  # a finding: the reason of an xfail(strict=True)


FWD = "def forward(x, ctx):\n    return x"
BWD = FWD + "\ndef backward(g, ctx):\n    return g"
LOSS = BWD + "\ndef loss(y, t):\n    return 0.0, y"
BAD = "def forward(x, ctx):\n    raise ValueError('bad batch')"
STAGES = {
    "none": [],
    "forward": [("s0", 0, FWD), ("s1", 1, FWD)],
    "backward": [("s0", 0, BWD), ("s1", 1, BWD)],
    "train": [("s0", 0, BWD), ("s1", 1, LOSS)],
    "virtual": [("s0", 0, BWD), ("s1", 1, BWD), ("s2", 0, BWD), ("s3", 1, LOSS)],
    "raising": [("s0", 0, FWD), ("s1", 1, BAD)],
    "single": [("s0", 0, LOSS)],
    "gradients": [("s0", 0, LOSS + "\ndef gradients():\n    return []")],
}


CASES = [
    # -- %%scatter ------------------------------------------------------------------------------
    Case("scatter-undefined", "%%scatter", "nope --gather c", "c = nope", "UsageError",
         r"`nope` \(to scatter\) is not defined in the notebook"),
    Case("scatter-dict", "%%scatter", "d --gather c", "c = d", "PartitionError",
         r"`d` is a dict, which cannot be split across engines.*--broadcast d"),
    Case("scatter-axis", "%%scatter", "a --axis 3 --gather c", "c = a", "PartitionError",
         r"--axis 3 is out of range for `a`, which has 1 dimension"),
    Case("scatter-lengths", "%%scatter", "a short --gather c", "c = a", "UsageError",
         r"same length along axis 0 .* `a` has 12, `short` has 5"),
    Case("scatter-few-rows", "%%scatter", "tiny --gather c", "c = tiny", "PartitionError",
         r"`tiny` has 2 row\(s\) along axis 0 but the cell would run on 3 engines.*--engines 0-1"),
    Case("scatter-empty", "%%scatter", "empty --gather c", "c = empty", "PartitionError",
         r"`empty` is empty along axis 0"),
    Case("scatter-reduce-op", "%%scatter", "a --reduce c=avg", "c = a", "UsageError",
         r"unknown reduce operation 'avg' in --reduce c=avg; use one of sum, prod, min, max"),
    Case("scatter-reduce-form", "%%scatter", "a --reduce c", "c = a", "UsageError",
         r"cannot read --reduce 'c'; write NAME=OP"),
    Case("scatter-reduce-shapes", "%%scatter", "a --reduce c=sum", "c = a[:rank + 1]",
         "PartitionError", r"cannot reduce `c` with sum: engines returned different shapes "
         r"\(engine 0: \(1,\), engine 1: \(2,\)", sent=True),
    Case("scatter-gather-scalars", "%%scatter", "a --gather c", "c = float(a.sum())",
         "PartitionError", r"each engine returned a single number.*--reduce c=list", sent=True),
    Case("scatter-by-column", "%%scatter", "df --by nope --gather c", "c = df", "UsageError",
         r"--by nope: no scattered table has a column 'nope' \(`df` has 'k', 'v'\)"),
    Case("scatter-by-array", "%%scatter", "a --by k --gather c", "c = a", "UsageError",
         r"--by k hash-partitions the rows of a DataFrame or Arrow table.*`a` is a ndarray"),
    Case("scatter-by-halo", "%%scatter", "df --by k --halo 1 --gather c", "c = df", "UsageError",
         r"--halo and --by k do not go together"),
    Case("scatter-frame-axis", "%%scatter", "df --axis 1 --gather c", "c = df", "PartitionError",
         r"`df` is a DataFrame, which splits by rows only, not along --axis 1"),
    Case("scatter-dimension", "%%scatter", "xa --axis depth --gather c", "c = xa",
         "PartitionError", r"`xa` has no dimension 'depth'; its dimensions are 'time', 'site'"),
    Case("scatter-syntax", "%%scatter", "a --gather c", "c = (a", "UsageError",
         r"the %%scatter cell has a syntax error on line 1.*Nothing was sent"),
    Case("scatter-engines-syntax", "%%scatter", "a --gather c --engines 0-", "c = a",
         "UsageError", r"cannot read --engines '0-': '0-' is not an engine id or a range"),
    Case("scatter-engines-backwards", "%%scatter", "a --gather c --engines 3-1", "c = a",
         "UsageError", r"the range 3-1 runs backwards; write 1-3"),
    Case("scatter-engines-unknown", "%%scatter", "a --gather c --engines 0,7", "c = a",
         "UsageError", r"engine\(s\) 7, which the pool does not have; available: 0-2"),
    Case("scatter-not-defined-by-cell", "%%scatter", "a --gather c", "x = 1", "UsageError",
         r"the cell did not define `c` on engine 0 \(rank 0\)", sent=True),
    Case("scatter-output-twice", "%%scatter", "a --gather c --reduce c=sum", "c = a",
         "UsageError", r"`c` is asked for twice \(--gather and --reduce\)"),
    Case("scatter-input-twice", "%%scatter", "a --broadcast a --gather c", "c = a",
         "UsageError", r"`a` is listed twice \(as scattered and as broadcast\)"),
    Case("scatter-reserved", "%%scatter", "a --gather rank", "pass", "UsageError",
         r"rank cannot be scattered, broadcast or returned"),
    Case("scatter-bad-name", "%%scatter", "a --gather 2c", "c = a", "UsageError",
         r"'2c' \(--gather\) is not a valid Python name"),
    Case("scatter-halo-alone", "%%scatter", "--halo 1 --gather c", "c = 1", "UsageError",
         r"--halo needs at least one scattered name"),
    Case("scatter-halo-negative", "%%scatter", "a --halo -1 --gather c", "c = a", "UsageError",
         r"--halo must be 0 or more, not -1"),
    Case("scatter-too-big-to-send", "%%scatter", "a --gather c", "c = a + bigv[:12]",
         "UsageError", r"reads `bigv` \(15\.3 MiB\).*over the 10\.0 MiB limit.*--broadcast bigv"),
    Case("scatter-unpicklable", "%%scatter", "a --gather c", "c = a if lock else a",
         "UsageError", r"reads `lock` .* cannot be sent to engines: TypeError: cannot pickle"),
    Case("scatter-cell-raises", "%%scatter", "a --gather c", "c = a; raise ValueError('boom')",
         "RemoteError", r"the %%scatter cell failed on engine 0, rank 0: ValueError: boom.*"
         r"line 1.*Also failed: engine 1, rank 1; engine 2, rank 2", sent=True),
    Case("scatter-unknown-option", "%%scatter", "a --gather c --bogus", "c = a", "UsageError",
         r"unrecognized arguments: --bogus"),
    Case("scatter-bad-transport", "%%scatter", "a --gather c --transport carrier", "c = a",
         "UsageError", r"invalid choice: 'carrier'"),
    Case("comm-op", "%%scatter", "a --gather c", "c = a\ncomm.allreduce(1, op='mean')",
         "RemoteError", r"CommError: comm.allreduce: unknown op 'mean'; use one of sum, prod",
         sent=True),
    Case("comm-root", "%%scatter", "a --gather c", "c = a\ncomm.bcast(c, root=5)", "RemoteError",
         r"root=5 is not a rank of this comm, which has ranks 0 to 2", sent=True),
    Case("comm-alltoall", "%%scatter", "a --gather c", "c = a\ncomm.alltoall([c])", "RemoteError",
         r"comm.alltoall needs a list of exactly 3 items, one per rank .* but got 1 items",
         sent=True),
    Case("comm-halo", "%%scatter", "a --gather c", "c = a\ncomm.halo(c, 9)", "RemoteError",
         r"comm.halo: k=9 rows were asked for, but rank 0 has only 4", sent=True),
    Case("comm-mismatch", "%%scatter", "a --gather c",
         "c = a\ncomm.barrier() if rank == 0 else comm.bcast(c)", "RemoteError",
         r"the ranks called different collectives: rank 0 called barrier\(\) \(call #1 at line 2\); "
         r"ranks 1, 2 called bcast\(root=0\)", sent=True),
    Case("comm-shapes", "%%scatter", "a --gather c", "c = a\ncomm.allreduce(a[:rank + 1])",
         "RemoteError", r"rank 0 called allreduce\(int64 \(1,\), op=sum\).*"
         r"rank 1 called allreduce\(int64 \(2,\), op=sum\)", sent=True),
    Case("comm-timeout", "%%scatter", "a --gather c --comm-timeout -5", "c = a\ncomm.barrier()",
         "UsageError", r"the comm timeout must be a number of seconds above 0, not -5"),
    Case("comm-backend", "%%scatter", "a --gather c --comm pigeon", "c = a\ncomm.barrier()",
         "UsageError", r"invalid choice: 'pigeon'"),
    # -- %%pmap ---------------------------------------------------------------------------------
    Case("pmap-no-in", "%%pmap", "x range(3) -> r", "x", "UsageError",
         r"cannot read `%%pmap x range\(3\) -> r`; write `%%pmap x in ITERABLE -> NAME`"),
    Case("pmap-no-arrow", "%%pmap", "x in range(3)", "x", "UsageError",
         r"cannot read `%%pmap x in range\(3\)`"),
    Case("pmap-target", "%%pmap", "1 in range(3) -> r", "x", "UsageError",
         r"'1' is not a loop variable"),
    Case("pmap-result-name", "%%pmap", "x in range(3) -> 2r", "x", "UsageError",
         r"the result name '2r' after -> is not a valid Python name"),
    Case("pmap-chunksize", "%%pmap", "x in range(3) -> r --chunksize 0", "x", "UsageError",
         r"--chunksize must be 1 or more, not 0"),
    Case("pmap-retries", "%%pmap", "x in range(3) -> r --retries -1", "x", "UsageError",
         r"--retries must be 0 or more, not -1"),
    Case("pmap-unknown-option", "%%pmap", "x in range(3) -> r --bogus", "x", "UsageError",
         r"%%pmap: unrecognized arguments: --bogus"),
    Case("pmap-transport", "%%pmap", "x in range(3) -> r --transport direct", "x", "UsageError",
         r"argument --transport: invalid choice: 'direct' \(choose from 'auto', 'shm', 'ipp'\)"),
    Case("pmap-not-iterable", "%%pmap", "x in 5 -> r", "x", "UsageError",
         r"needs something to iterate over, but got a int"),
    Case("pmap-engines-unknown", "%%pmap", "x in range(3) -> r --engines 9", "x", "UsageError",
         r"engine\(s\) 9, which the pool does not have"),
    Case("pmap-syntax", "%%pmap", "x in range(3) -> r", "y = x\nreturn y +", "UsageError",
         r"the %%pmap cell has a syntax error on line 2"),
    Case("pmap-too-big-to-send", "%%pmap", "x in range(3) -> r", "bigv[x]", "UsageError",
         r"reads `bigv` \(15\.3 MiB\).*over the 10\.0 MiB limit.*Make `bigv` the iterable"),
    Case("pmap-items-fail", "%%pmap", "x in range(4) -> r", "1 / (x - 2)", "PmapError",
         r"1 of 4 items failed \(indices 2\).*ZeroDivisionError", sent=True),
    Case("pmap-iterable-undefined", "%%pmap", "x in nope -> r", "x", "UsageError",
         r"`nope` .*is not defined in the notebook"),
    Case("pmap-comm", "%%pmap", "x in range(3) -> r", "comm.allreduce(x)", "UsageError",
         r"`comm` is not defined in %%pmap: items run one at a time"),
    # -- %%stage --------------------------------------------------------------------------------
    Case("stage-no-name", "%%stage", "", FWD, "UsageError",
         r"%%stage: the following arguments are required: name"),
    Case("stage-bad-name", "%%stage", "1bad", FWD, "UsageError",
         r"stage name '1bad' is not a valid Python name"),
    Case("stage-engine-unknown", "%%stage", "s --engine 9", FWD, "UsageError",
         r"--engine 9 is not in the pool; available: \[0, 1, 2\]"),
    Case("stage-engine-not-int", "%%stage", "s --engine x", FWD, "UsageError",
         r"argument --engine: invalid int value: 'x'"),
    Case("stage-unknown-option", "%%stage", "s --bogus", FWD, "UsageError",
         r"%%stage: unrecognized arguments: --bogus"),
    Case("stage-no-forward", "%%stage", "s", "W = 1", "UsageError",
         r"stage `s` does not define forward\(x, ctx\)", sent=True),
    Case("stage-syntax", "%%stage", "s", "def forward(x, ctx):\n    return x +", "UsageError",
         r"the %%stage s cell has a syntax error on line 2"),
    Case("stage-cell-raises", "%%stage", "s", "raise RuntimeError('init failed')",
         "RemoteError", r"the %%stage s cell failed on engine 0, stage s: RuntimeError: init "
         r"failed", sent=True),
    Case("stage-comm", "%%stage", "s", "def forward(x, ctx):\n    return comm.allreduce(x)",
         "UsageError", r"`comm` is not defined in %%stage s: a stage on one engine has no other "
         "engines to talk to"),
    Case("stage-engines-both", "%%stage", "s --engine 0 --engines 0,1", FWD, "UsageError",
         r"give a stage either --engine K \(one engine\) or --engines A,B,\.\.\. \(tensor "
         r"parallel over several\), not both"),
    Case("stage-engines-twice", "%%stage", "s --engines 1,1", FWD, "UsageError",
         r"--engines 1,1 names an engine twice"),
    Case("stage-engines-unknown", "%%stage", "s --engines 0,9", FWD, "UsageError",
         r"--engines: engine\(s\) \[9\] are not in the pool"),
    Case("stage-engines-text", "%%stage", "s --engines 0-1", FWD, "UsageError",
         r"--engines '0-1': list engine ids with commas, like --engines 0,1"),
    Case("stage-engines-overlap", "%%stage", "t --engines 1,2", FWD, "UsageError",
         r"stage `t` on engines \[1, 2\] would share engine\(s\) \[1\] with stage `s1`",
         stages="forward"),
    # -- %pipeline ------------------------------------------------------------------------------
    Case("train-data-parallel-engines", "%pipeline",
         "train --input x --target x --microbatches 2 --data-parallel 2 --out y", None,
         "UsageError", r"--data-parallel 2 needs 2 copies of the stages' 2 engine\(s\), 4 "
         r"engines, but the pool has 3", stages="train"),
    Case("train-data-parallel-zero", "%pipeline",
         "train --input x --target x --microbatches 2 --data-parallel 0 --out y", None,
         "UsageError", r"--data-parallel must be a whole number of replicas, 1 or more, not 0",
         stages="train"),
    Case("train-no-gradients", "%pipeline",
         "train --input x --target x --microbatches 2 --data-parallel 2 --out y", None,
         "UsageError", r"stage\(s\) `s0` define no gradients\(\)", stages="single"),
    Case("train-replica-rows", "%pipeline",
         "train --input x --target x --microbatches 8 --data-parallel 2 --out y", None,
         "UsageError", r"micro-batch 0 has 1 row\(s\), fewer than the 2 data-parallel "
         r"replicas", stages="gradients"),
    Case("train-precision", "%pipeline",
         "train --input x --target x --microbatches 2 --precision fp8 --out y", None,
         "UsageError", r"unknown precision 'fp8'; use fp32", stages="train"),
    Case("pipeline-no-command", "%pipeline", "", None, "UsageError",
         r"%pipeline: the following arguments are required: command"),
    Case("pipeline-unknown-command", "%pipeline", "fly", None, "UsageError",
         r"argument command: invalid choice: 'fly'"),
    Case("pipeline-show-extra", "%pipeline", "show extra", None, "UsageError",
         r"%pipeline: unrecognized arguments: extra"),
    Case("run-no-stages", "%pipeline", "run --input x --out y", None, "UsageError",
         r"no stages yet: define them with %%stage NAME cells"),
    Case("run-no-input", "%pipeline", "run --out y", None, "UsageError",
         r"%pipeline run: the following arguments are required: --input"),
    Case("run-input-undefined", "%pipeline", "run --input nope --out y", None, "UsageError",
         r"`nope` \(--input\) is not defined in the notebook", stages="forward"),
    Case("run-microbatches-rows", "%pipeline", "run --input x --microbatches 99 --out y", None,
         "UsageError", r"--input has 8 rows, fewer than --microbatches 99; use at most 8",
         stages="forward"),
    Case("run-microbatches-zero", "%pipeline", "run --input x --microbatches 0 --out y", None,
         "ScheduleError", r"number of micro-batches m must be a whole number >= 1, got 0",
         stages="forward"),
    Case("run-schedule", "%pipeline", "run --input x --out y --schedule 1f1b", None,
         "UsageError", r"argument --schedule: invalid choice: '1f1b' \(choose from 'gpipe'\)",
         stages="forward"),
    Case("run-stage-raises", "%pipeline", "run --input x --microbatches 2 --out y", None,
         "RemoteError", r"the pipeline failed on engine 1, stage s1, micro-batch 0, forward: "
         r"ValueError: bad batch", sent=True, stages="raising"),
    Case("run-bad-out", "%pipeline", "run --input x --microbatches 2 --out 2y", None,
         "UsageError", r"--out '2y' is not a valid Python name", stages="forward"),
    Case("train-no-backward", "%pipeline", "train --input x --target x --microbatches 2 --out y",
         None, "UsageError", r"stage `s0` lacks backward, which training with --schedule 1f1b "
         r"needs", stages="forward"),
    Case("train-no-loss", "%pipeline", "train --input x --target x --microbatches 2 --out y",
         None, "UsageError", r"the last stage `s1` must define loss\(y, target\)",
         stages="backward"),
    Case("train-zb-hooks", "%pipeline",
         "train --input x --target x --microbatches 2 --schedule zb-h1 --out y", None,
         "UsageError", r"lacks backward_input, backward_weight, which training with --schedule "
         r"zb-h1 needs", stages="train"),
    Case("train-unknown-schedule", "%pipeline",
         "train --input x --target x --microbatches 2 --schedule bogus --out y", None,
         "ScheduleError", r"Unknown pipeline schedule 'bogus': choose one of gpipe, 1f1b, "
         r"interleaved, zb-h1", stages="train"),
    Case("train-steps", "%pipeline",
         "train --input x --target x --microbatches 2 --steps 0 --out y", None, "UsageError",
         r"--steps must be 1 or more, not 0", stages="train"),
    Case("train-target-rows", "%pipeline", "train --input x --target t --microbatches 2 --out y",
         None, "UsageError", r"--input has 8 rows but --target has 6", stages="train"),
    Case("train-target-undefined", "%pipeline",
         "train --input x --target nope --microbatches 2 --out y", None, "UsageError",
         r"`nope` \(--input/--target\) is not defined", stages="train"),
    Case("train-virtual", "%pipeline", "train --input x --target x --microbatches 2 --out y",
         None, "UsageError", r"4 stages on 2 engines are virtual stages; train them with "
         r"--schedule interleaved", stages="virtual"),
    Case("train-interleaved-m", "%pipeline",
         "train --input x --target x --microbatches 5 --schedule interleaved --out y", None,
         "ScheduleError", r"max\(1, m // p\) rounds of equal size .* m=5 with p=2 does not divide "
         r"into 2 rounds: use m=4 or m=6", stages="virtual"),
    Case("schedule-stages-zero", "%pipeline", "schedule --stages 0 --microbatches 4", None,
         "ScheduleError", r"number of ranks \(stages\) p must be a whole number >= 1, got 0"),
    Case("schedule-interleaved-m", "%pipeline",
         "schedule --stages 2 --microbatches 5 --schedule interleaved --virtual 2", None,
         "ScheduleError", r"m=5 with p=2 does not divide into 2 rounds: use m=4 or m=6"),
    Case("schedule-virtual", "%pipeline",
         "schedule --stages 2 --microbatches 4 --schedule 1f1b --virtual 2", None,
         "ScheduleError", r"v=2 virtual stages per rank needs schedule 'interleaved'"),
    Case("schedule-costs", "%pipeline",
         "schedule --stages 2 --microbatches 4 --compare --costs f=x", None, "ScheduleError",
         r"--costs f=x: a time must be a number, 0 or more"),
    Case("train-max-stash", "%pipeline",
         "train --input x --target x --microbatches 2 --schedule auto --max-stash 0 --out y", None,
         "UsageError", r"--max-stash must be a number of micro-batches above 0, not 0",
         stages="train"),
    Case("schedule-unknown", "%pipeline",
         "schedule --stages 2 --microbatches 4 --schedule pipedream", None, "ScheduleError",
         r"Unknown pipeline schedule 'pipedream'"),
    Case("schedule-not-int", "%pipeline", "schedule --stages x --microbatches 4", None,
         "UsageError", r"argument --stages: invalid int value: 'x'"),
    Case("schedule-missing", "%pipeline", "schedule --stages 2", None, "UsageError",
         r"the following arguments are required: --microbatches"),
    # -- %nbp -----------------------------------------------------------------------------------
    Case("nbp-no-command", "%nbp", "", None, "UsageError",
         r"%nbp: the following arguments are required: command"),
    Case("nbp-unknown-command", "%nbp", "frobnicate", None, "UsageError",
         r"argument command: invalid choice: 'frobnicate'"),
    Case("start-n-not-int", "%nbp", "start -n abc", None, "UsageError",
         r"%nbp start: argument -n: invalid int value: 'abc'"),
    Case("start-n-negative", "%nbp", "start -n -1", None, "UsageError",
         r"-n must be at least 1, not -1"),
    Case("start-n-zero", "%nbp", "start -n 0", None, "UsageError",
         r"-n must be at least 1, not 0"),
    Case("connect-profile", "%nbp", "connect --profile nothere", None, "PoolError",
         r"no cluster to connect to: .*profile_nothere.* does not exist.*"
         r"There is no IPython profile 'nothere' \(the profiles here are: .*default\)"),
    Case("connect-cluster-id", "%nbp", "connect --cluster-id nope", None, "PoolError",
         r"no cluster to connect to: .*ipcontroller-nope-client\.json does not exist.*"
         r"--cluster-id=nope"),
    Case("connect-wait-negative", "%nbp", "connect --wait -5", None, "UsageError",
         r"argument --wait: takes a number of seconds, 0 or more; not '-5'"),
    Case("connect-n-zero", "%nbp", "connect -n 0", None, "UsageError",
         r"-n takes a number of engines, 1 or more, not 0"),
    Case("trace-no-file", "%nbp", "trace", None, "UsageError",
         r"%nbp trace: the following arguments are required: action, file"),
    Case("trace-action", "%nbp", "trace load t.json", None, "UsageError",
         r"argument action: invalid choice: 'load' \(choose from 'save'\)"),
    Case("trace-unwritable", "%nbp", "trace save /nonexistent-dir/t.json", None, "UsageError",
         r"cannot write .*/nonexistent-dir/t\.json"),
    Case("dashboard-state", "%nbp", "dashboard maybe", None, "UsageError",
         r"argument state: invalid choice: 'maybe' \(choose from 'on', 'off'\)"),
    Case("dashboard-missing", "%nbp", "dashboard", None, "UsageError",
         r"%nbp dashboard: the following arguments are required: state"),
    Case("stop-extra", "%nbp", "stop now", None, "UsageError",
         r"%nbp: unrecognized arguments: now"),
]


def _params():
    for case in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=case.fix)] if case.fix else []
        yield pytest.param(case, id=case.id, marks=marks)


# -- docs/errors.md ------------------------------------------------------------------------------


def _cells(row: str) -> list[str]:
    parts = re.split(r"(?<!\\)\|", row.strip().strip("|"))
    return [p.strip().replace("\\|", "|") for p in parts]


def doc_rows() -> dict[str, dict[str, str]]:
    """Rows of the catalogue tables: id -> input, error, excerpt, what to do."""
    rows = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if not line.startswith("| `"):
            continue
        cells = _cells(line)
        assert len(cells) == 5, line
        ident, given, error, excerpt, todo = cells
        ident = re.match(r"`([^`]+)`", ident).group(1)  # a finding carries a mark after the id
        assert ident not in rows, f"{ident} is in docs/errors.md twice"
        rows[ident] = {"input": given, "error": error.strip("`"), "excerpt": excerpt, "do": todo}
    return rows


def normal(text: str) -> str:
    """Whitespace collapsed and markdown code marks dropped, for comparing excerpts."""
    return " ".join(text.replace("`", "").split())


def test_every_row_of_the_catalogue_has_a_case_and_every_case_a_row():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    rows = doc_rows()
    assert sorted(set(rows) - set(ids)) == [], "rows of docs/errors.md without a test case"
    assert sorted(set(ids) - set(rows)) == [], "test cases without a row in docs/errors.md"
    assert len(rows) >= 30
    for case in CASES:
        row = rows[case.id]
        assert row["error"] == case.error, case.id
        assert row["excerpt"] and row["do"], case.id
        assert normal(case.line) in normal(row["input"]), case.id
    magics = {case.magic for case in CASES}
    assert magics == {"%%scatter", "%%pmap", "%%stage", "%pipeline", "%nbp"}
    for command in ("run", "train", "schedule", "show"):
        assert any(c.magic == "%pipeline" and c.line.startswith(command) for c in CASES)
    for command in ("start", "connect", "trace", "dashboard"):
        assert any(c.magic == "%nbp" and c.line.startswith(command) for c in CASES)


# -- the cases -----------------------------------------------------------------------------------


@pytest.fixture
def no_new_cluster(monkeypatch):
    """`%nbp start` cases must never replace the session's pool with a cluster of their own."""
    import ipyparallel

    class Refused:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("the catalogue starts no cluster")

    monkeypatch.setattr(ipyparallel, "Cluster", Refused)


@pytest.fixture(scope="module")
def documented():
    return doc_rows()


def _frame():
    import pandas as pd
    return pd.DataFrame({"k": list("abcdef"), "v": np.arange(6.0)})


def _dataarray():
    import xarray as xr
    return xr.DataArray(np.zeros((4, 3)), dims=("time", "site"))


@pytest.mark.parametrize("case", list(_params()))
def test_bad_input_is_refused_as_documented_and_changes_nothing(ip, pool, no_new_cluster,
                                                                documented, case):
    pool.pipeline.clear()
    for name, engine, code in STAGES[case.stages]:
        pool.pipeline.define(name, code, engine, {})
    ip.user_ns.update(a=np.arange(12), short=np.arange(5), tiny=np.arange(2), empty=np.zeros(0),
                      d={"k": 1}, bigv=np.zeros(2_000_000), lock=threading.Lock(),
                      x=np.zeros((8, 2)), t=np.zeros((6, 2)), c="before", r="before",
                      y="before", df=_frame(), xa=_dataarray())
    before = dict(ip.user_ns)
    stages = dict(pool.pipeline.stages)
    sent = len(pool.pool.client.history)
    try:
        with pytest.raises(Exception) as info:
            if case.cell is None:
                ip.run_line_magic(case.magic.lstrip("%"), case.line)
            else:
                ip.run_cell_magic(case.magic.lstrip("%"), case.line, case.cell)
        exc = info.value
        message = str(exc)
        assert type(exc) is CLASSES[case.error], f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
        assert re.search(case.pattern, message, re.S), message
        assert normal(documented[case.id]["excerpt"]) in normal(message), message
        assert set(ip.user_ns) == set(before)
        changed = [k for k, v in before.items() if ip.user_ns[k] is not v]
        assert changed == [], changed
        assert pool.pipeline.stages == stages
        if not case.sent:
            assert len(pool.pool.client.history) == sent, "something was sent to the engines"
        assert nbparallel.current() is pool
    finally:
        pool.pipeline.clear()
